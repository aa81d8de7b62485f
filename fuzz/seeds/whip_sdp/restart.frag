a=ice-ufrag:new1
a=ice-pwd:newpasswordnewpasswordxx
