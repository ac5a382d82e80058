import socket, threading, time, sys
port = int(sys.argv[1]); secs = float(sys.argv[2])
c = socket.create_connection(("127.0.0.1", port)); c.settimeout(None)
stop = False; got = [0]; last = [time.time()]
def rd():
    while True:
        d = c.recv(262144)
        if not d: break
        got[0] += len(d); last[0] = time.time()
t = threading.Thread(target=rd, daemon=True); t.start()
chunk = b"Z" * 131072; end = time.time() + secs; sent = 0
c.settimeout(4.0)
try:
    while time.time() < end:
        c.sendall(chunk); sent += len(chunk)
except socket.timeout:
    print("WRITE STALL sent=%d got=%d" % (sent, got[0])); sys.stdout.flush(); time.sleep(30)
c.shutdown(socket.SHUT_WR)
t.join(6)
print("sent=%d got=%d %s" % (sent, got[0], "OK" if got[0]==sent else "STALL"))
if got[0] != sent: time.sleep(30)
