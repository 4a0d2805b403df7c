"""Sends one ICMP echo to each address given on stdin, in batches, and prints
how many answered and the median RTT. Usage: echo_each.py SRC BATCH < addrs"""
import socket, statistics, struct, sys, time

def checksum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF

src, batch = sys.argv[1], int(sys.argv[2])
addrs = sys.stdin.read().split()
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.bind((src, 0))
ident = 0x5E1F
sent, rtts = {}, {}
for start in range(0, len(addrs), batch):
    part = range(start, min(start + batch, len(addrs)))
    for i in part:
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, i & 0xFFFF)
        sent[i] = time.monotonic()
        sock.sendto(struct.pack("!BBHHH", 8, 0, checksum(hdr), ident, i & 0xFFFF), (addrs[i], 0))
    deadline = time.monotonic() + 3
    sock.settimeout(0.2)
    while time.monotonic() < deadline and not all(i in rtts for i in part):
        try:
            data = sock.recv(2048)
        except socket.timeout:
            continue
        icmp = data[(data[0] & 0x0F) * 4:]
        kind, _, _, rid, seq = struct.unpack("!BBHHH", icmp[:8])
        if kind == 0 and rid == ident and seq in sent and seq not in rtts:
            rtts[seq] = time.monotonic() - sent[seq]
missing = [addrs[i] for i in range(len(addrs)) if i not in rtts]
med = statistics.median(rtts.values()) * 1000 if rtts else 0
print(f"{len(rtts)} of {len(addrs)} answered the first echo, median rtt {med:.3f} ms; missing: {' '.join(missing[:10])}")
