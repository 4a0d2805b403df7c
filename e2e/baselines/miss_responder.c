/*
 * The smallest L3-miss responder that does weir's work, as B5's baseline.
 *
 * usage (inside a node's netns): miss_responder [--hear-all] DEV PEER_VTEP_MAC PEER_UNDERLAY_IP
 *
 * On every RTM_GETNEIGH (an L3 miss, raised because app_solicit > 0) for an
 * IPv4 address on DEV, it writes what weir's on-demand answer writes, in the
 * same shape: the peer's fdb entry (no ack asked) and the permanent
 * neighbour (ack asked), as two messages in one sendmsg, then drains the ack.
 * It knows one peer, so it does no lookup: whatever weir spends finding the
 * peer is part of the difference this baseline measures.
 *
 * Its miss socket hears misses only, through the kernel filter weir's has.
 * Without it (--hear-all, a reference row) every neighbour notification wakes
 * it, among them the deletes that start each B5 trial 30 ms before the ping:
 * a warm-up weir's responder does not get, worth about a tenth of the first
 * packet's time (BENCHMARKS.md, B5).
 */
#include <arpa/inet.h>
#include <linux/filter.h>
#include <linux/neighbour.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static size_t put_neigh(char *out, uint16_t family, int ifindex, const uint8_t mac[6], const void *dst, int dst_len,
                        uint32_t seq, int ack) {
    struct nlmsghdr *h = (struct nlmsghdr *)out;
    struct ndmsg *nd = NLMSG_DATA(h);
    struct rtattr *a;
    memset(out, 0, NLMSG_SPACE(sizeof(*nd)));
    h->nlmsg_type = RTM_NEWNEIGH;
    h->nlmsg_flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE | (ack ? NLM_F_ACK : 0);
    h->nlmsg_seq = seq;
    nd->ndm_family = family;
    nd->ndm_ifindex = ifindex;
    nd->ndm_state = NUD_PERMANENT;
    nd->ndm_flags = family == AF_BRIDGE ? NTF_SELF : 0;
    nd->ndm_type = RTN_UNICAST;
    h->nlmsg_len = NLMSG_LENGTH(sizeof(*nd));
    a = (struct rtattr *)(out + NLMSG_ALIGN(h->nlmsg_len));
    a->rta_type = NDA_LLADDR;
    a->rta_len = RTA_LENGTH(6);
    memcpy(RTA_DATA(a), mac, 6);
    h->nlmsg_len = NLMSG_ALIGN(h->nlmsg_len) + RTA_ALIGN(a->rta_len);
    a = (struct rtattr *)(out + h->nlmsg_len);
    a->rta_type = NDA_DST;
    a->rta_len = RTA_LENGTH(dst_len);
    memcpy(RTA_DATA(a), dst, dst_len);
    h->nlmsg_len += RTA_ALIGN(a->rta_len);
    return NLMSG_ALIGN(h->nlmsg_len);
}

/* Drops every message but RTM_GETNEIGH before it is queued. BPF loads in
 * network byte order; netlink headers are in host order. */
static int hear_misses_only(int sock) {
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, offsetof(struct nlmsghdr, nlmsg_type)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, htons(RTM_GETNEIGH), 0, 1),
        BPF_STMT(BPF_RET | BPF_K, 0xffffffff),
        BPF_STMT(BPF_RET | BPF_K, 0),
    };
    struct sock_fprog prog = {.len = sizeof(code) / sizeof(code[0]), .filter = code};
    return setsockopt(sock, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog));
}

int main(int argc, char **argv) {
    uint8_t mac[6];
    struct in_addr underlay;
    const char *name = argv[0];
    int hear_all = argc > 1 && strcmp(argv[1], "--hear-all") == 0;
    argc -= hear_all;
    argv += hear_all;
    if (argc != 4 || sscanf(argv[2], "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4],
                            &mac[5]) != 6 || inet_pton(AF_INET, argv[3], &underlay) != 1) {
        fprintf(stderr, "usage: %s [--hear-all] DEV PEER_VTEP_MAC PEER_UNDERLAY_IP\n", name);
        return 2;
    }
    int ifindex = if_nametoindex(argv[1]);
    if (!ifindex) {
        perror(argv[1]);
        return 1;
    }
    int listener = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    int writer = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    struct sockaddr_nl groups = {.nl_family = AF_NETLINK, .nl_groups = RTMGRP_NEIGH};
    struct sockaddr_nl none = {.nl_family = AF_NETLINK};
    if (listener < 0 || writer < 0 || bind(listener, (struct sockaddr *)&groups, sizeof(groups)) < 0 ||
        bind(writer, (struct sockaddr *)&none, sizeof(none)) < 0 || (!hear_all && hear_misses_only(listener) < 0)) {
        perror("netlink");
        return 1;
    }
    static char in[65536], out[512], acks[4096];
    uint32_t seq = 0;
    for (;;) {
        ssize_t n = recv(listener, in, sizeof(in), 0);
        if (n < 0) {
            perror("recv"); /* ENOBUFS: misses lost; keep going, as a baseline */
            continue;
        }
        for (struct nlmsghdr *h = (struct nlmsghdr *)in; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type != RTM_GETNEIGH)
                continue;
            struct ndmsg *nd = NLMSG_DATA(h);
            if (nd->ndm_ifindex != ifindex || nd->ndm_family != AF_INET)
                continue;
            int len = RTM_PAYLOAD(h);
            const void *dst = NULL;
            for (struct rtattr *a = (struct rtattr *)((char *)nd + NLMSG_ALIGN(sizeof(*nd))); RTA_OK(a, len);
                 a = RTA_NEXT(a, len))
                if (a->rta_type == NDA_DST && RTA_PAYLOAD(a) == 4)
                    dst = RTA_DATA(a);
            if (!dst)
                continue;
            size_t used = put_neigh(out, AF_BRIDGE, ifindex, mac, &underlay, 4, ++seq, 0);
            used += put_neigh(out + used, AF_INET, ifindex, mac, dst, 4, ++seq, 1);
            if (send(writer, out, used, 0) < 0)
                perror("send");
            else
                recv(writer, acks, sizeof(acks), 0);
        }
    }
    return 0;
}
