"""Long-lived TCP connections for the disruption tests, run inside a pod's
network namespace with the host's python.

    tcp_probe.py serve PORT             # echo server, one thread a connection
    tcp_probe.py probe PORT IP [IP...]  # one connection per IP

`probe` sends 8 bytes on every connection, waits for their echo, and sends
again 50 ms later. It prints "ready" once every connection is open, and on
SIGTERM a JSON line with, per connection, whether it broke (reset, EOF or a
socket error; a stall is not a break) and the longest time between two
echoes. Waiting for an echo never blocks the other connections."""

import contextlib
import json
import selectors
import signal
import socket
import sys
import threading
import time

MESSAGE = b"weir-tcp"
INTERVAL = 0.05


def serve(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(128)

    def echo(conn):
        # A probe that is stopped resets its connections; that is its end, not an error.
        with conn, contextlib.suppress(ConnectionError):
            while data := conn.recv(4096):
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def probe(port, ips):
    sel = selectors.DefaultSelector()
    conns = []
    for ip in ips:
        s = socket.create_connection((ip, port), timeout=10)
        s.setblocking(False)
        now = time.monotonic()
        c = {"ip": ip, "sock": s, "got": b"", "waiting": False, "next": now, "last": now, "max_gap": 0.0,
             "echoes": 0, "broken": None}
        conns.append(c)
        sel.register(s, selectors.EVENT_READ, c)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)

    def broke(c, why):
        c["broken"] = why
        sel.unregister(c["sock"])

    while not stop:
        now = time.monotonic()
        for c in conns:
            if not c["broken"] and not c["waiting"] and now >= c["next"]:
                try:
                    c["sock"].send(MESSAGE)
                    c["waiting"] = True
                except BlockingIOError:
                    pass
                except OSError as e:
                    broke(c, repr(e))
        for key, _ in sel.select(timeout=0.01):
            c = key.data
            try:
                data = c["sock"].recv(64)
            except BlockingIOError:
                continue
            except OSError as e:
                broke(c, repr(e))
                continue
            if not data:
                broke(c, "closed by the peer (EOF)")
                continue
            c["got"] += data
            if len(c["got"]) >= len(MESSAGE):
                now = time.monotonic()
                c["got"], c["waiting"] = b"", False
                c["max_gap"] = max(c["max_gap"], now - c["last"])
                c["last"], c["next"] = now, now + INTERVAL
                c["echoes"] += 1
    now = time.monotonic()
    report = [{"ip": c["ip"], "broken": c["broken"], "echoes": c["echoes"],
               "max_gap_ms": round(1000 * max(c["max_gap"], now - c["last"] if not c["broken"] else 0), 1)}
              for c in conns]
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        probe(int(sys.argv[2]), sys.argv[3:])
