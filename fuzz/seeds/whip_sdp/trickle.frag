a=ice-ufrag:EsAw
a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y
m=audio 9 UDP/TLS/RTP/SAVPF 0
a=mid:0
a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host
a=end-of-candidates
