
ralice