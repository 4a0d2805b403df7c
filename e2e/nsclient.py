"""HTTP from inside a lab namespace, where the host's own sockets cannot go:
run as `ip netns exec NS python3 e2e/nsclient.py ...`, or imported by
programs that already run there (bench_load.py).

    nsclient.py get URL                        # {"status": ..., "body": ...}
    nsclient.py post URL                       # body on stdin
    nsclient.py api METHOD PATH [--token T]    # body on stdin; admin
                                               # certificate unless --token
    nsclient.py api METHOD PATH --ctype CT     # content type (default JSON)

Every command prints one JSON object: the status and the body. A
connection that fails prints status 0 and the error as the body.
"""

import argparse
import http.client
import json
import os
import ssl
import sys
import urllib.error
import urllib.request

STATE = os.environ.get("WEIR_LAB_STATE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".state"))
API_HOST = "198.18.0.2"


class ApiClient:
    """One keep-alive connection to the lab's API server, as the lab admin
    (client certificate) or with a bearer token."""

    def __init__(self, token=None, timeout=30):
        pki = os.path.join(STATE, "pki")
        self.ctx = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
        if token is None:
            self.ctx.load_cert_chain(os.path.join(pki, "admin.crt"), os.path.join(pki, "admin.key"))
        self.token, self.timeout = token, timeout
        self.conn = self.connect()

    def connect(self):
        return http.client.HTTPSConnection(API_HOST, 6443, context=self.ctx, timeout=self.timeout)

    def request(self, method, path, body=None, ctype="application/json"):
        """(status, body text); a body that is not already text is sent as JSON."""
        headers = {"Content-Type": ctype}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read().decode()

    def must(self, method, path, body=None, ctype="application/json"):
        status, text = self.request(method, path, body, ctype)
        if status >= 300:
            raise SystemExit(f"{method} {path}: {status} {text[:200]}")
        return text


def get(url, timeout=10, data=None):
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout)
        return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def main():
    p = argparse.ArgumentParser(prog="nsclient.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    for verb in ("get", "post"):
        sub.add_parser(verb).add_argument("url")
    a = sub.add_parser("api")
    a.add_argument("method")
    a.add_argument("path")
    a.add_argument("--token")
    a.add_argument("--ctype", default="application/json")
    args = p.parse_args()
    if args.cmd in ("get", "post"):
        status, body = get(args.url, data=sys.stdin.read().encode() if args.cmd == "post" else None)
    else:
        try:
            status, body = ApiClient(token=args.token).request(args.method, args.path, sys.stdin.read() or None,
                                                                args.ctype)
        except OSError as e:
            status, body = 0, str(e)
    print(json.dumps({"status": status, "body": body}))


if __name__ == "__main__":
    main()
