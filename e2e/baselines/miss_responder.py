#!/usr/bin/env python3
"""B5's plain-Python baseline doing weir's work: on every L3 miss for DEV it
writes the peer's fdb entry (no ack) and the permanent neighbour (ack), as
two messages in one send, and reads the ack. The same work as
miss_responder.c and weir's answer; ../shared/tools/miss_responder.py writes
the neighbour only and stays as a reference row. Like weir's and the C
responder's, its miss socket hears misses only (a kernel filter), so the
deletes that start each trial do not wake it.

usage (inside a node's netns): miss_responder.py DEV PEER_VTEP_MAC PEER_UNDERLAY_IP
"""
import ctypes
import socket
import struct
import sys

RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 1, 4, 0x100, 0x400
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT, NTF_SELF, RTN_UNICAST = 0x80, 0x02, 1
AF_BRIDGE = 7
RTMGRP_NEIGH = 4
SO_ATTACH_FILTER = 26


def attr(kind, value):
    length = 4 + len(value)
    return struct.pack("HH", length, kind) + value + b"\0" * (-length % 4)


def neighbour(family, ifindex, mac, dst, seq, ack):
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE | (NLM_F_ACK if ack else 0)
    body = struct.pack("BxxxiHBB", family, ifindex, NUD_PERMANENT, NTF_SELF if family == AF_BRIDGE else 0, RTN_UNICAST)
    body += attr(NDA_LLADDR, mac) + attr(NDA_DST, dst)
    return struct.pack("IHHII", 16 + len(body), RTM_NEWNEIGH, flags, seq, 0) + body


def hear_misses_only(sock):
    """Drops every message but RTM_GETNEIGH before it is queued. BPF loads in
    network byte order; netlink headers are in host order."""
    load_half, jump_if_equal, ret = 0x28, 0x15, 0x06  # BPF_LD|BPF_H|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    nlmsg_type = 4
    program = [(load_half, 0, 0, nlmsg_type), (jump_if_equal, 0, 1, socket.htons(RTM_GETNEIGH)), (ret, 0, 0, 0xFFFFFFFF),
               (ret, 0, 0, 0)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HP", len(program), ctypes.addressof(code)))


def misses(data, ifindex):
    """The IPv4 addresses of the L3 misses for ifindex in one datagram."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("IH", data, off)
        if kind == RTM_GETNEIGH:
            family, idx = struct.unpack_from("Bxxxi", data, off + 16)
            a = off + 28
            while family == socket.AF_INET and idx == ifindex and a + 4 <= off + length:
                alen, akind = struct.unpack_from("HH", data, a)
                if akind == NDA_DST and alen == 8:
                    yield data[a + 4:a + 8]
                a += (alen + 3) & ~3
        off += (length + 3) & ~3


def main():
    dev, mac, underlay = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), socket.inet_aton(sys.argv[3])
    ifindex = socket.if_nametoindex(dev)
    listener = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    listener.bind((0, RTMGRP_NEIGH))
    hear_misses_only(listener)
    writer = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    writer.bind((0, 0))
    seq = 0
    while True:
        for dst in misses(listener.recv(65536), ifindex):
            writer.send(neighbour(AF_BRIDGE, ifindex, mac, underlay, seq + 1, False)
                        + neighbour(socket.AF_INET, ifindex, mac, dst, seq + 2, True))
            seq += 2
            writer.recv(4096)


if __name__ == "__main__":
    main()
