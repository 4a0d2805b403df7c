//! Kernel-side filters for notification sockets. A notification the filter
//! drops never wakes the reader and never takes room in its receive buffer,
//! which is what overflows (ENOBUFS) when a busy node's neighbour churn lands
//! on a socket that only cares about a few messages.

/// One test in a notification filter; see `filter_notifications`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterRule {
    /// Drop messages of this netlink type.
    DropType(u16),
    /// Drop messages of every type but this one.
    OnlyType(u16),
    /// Drop notifications caused by requests from this netlink port (the
    /// kernel puts the requester's port id in nlmsg_pid).
    DropSender(u32),
    /// Drop new or replaced fdb entries (RTM_NEWNEIGH, AF_BRIDGE). vxlan
    /// reports them with nlmsg_pid 0, so `DropSender` cannot tell whose they
    /// are.
    DropNewFdb,
}

/// Attaches a classic BPF filter built from `rules`, applied in order; a
/// message that no rule drops is accepted. The kernel runs it before queueing,
/// so dropped messages neither wake the reader nor use its receive buffer.
/// Multicast notifications are one message per datagram, so the first header
/// decides.
pub fn filter_notifications(socket: &netlink_sys::Socket, rules: &[FilterRule]) -> std::io::Result<()> {
    let mut program = filter_program(rules);
    // The kernel copies the program during the call, while `program` lives.
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
    super::set_socket_option(socket, libc::SO_ATTACH_FILTER, &fprog)
}

fn filter_program(rules: &[FilterRule]) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const TYPE_OFFSET: u32 = 4;
    const PID_OFFSET: u32 = 12;
    const FAMILY_OFFSET: u32 = 16;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // BPF loads in network byte order; netlink headers are in host order.
    let half = |t: u16| u32::from(u16::from_be_bytes(t.to_ne_bytes()));
    let len = |rule: &FilterRule| if *rule == FilterRule::DropNewFdb { 4 } else { 2 };
    // The rules, then "accept", then "drop".
    let drop_at = rules.iter().map(len).sum::<usize>() + 1;
    let mut program = Vec::with_capacity(drop_at + 1);
    for rule in rules {
        // Jump offsets count from the next instruction; every rule ends in
        // the jump that may drop.
        let to_drop = (drop_at - (program.len() + len(rule))) as u8;
        match *rule {
            FilterRule::DropType(t) => {
                program.push(insn(LD_H_ABS, 0, 0, TYPE_OFFSET));
                program.push(insn(JEQ_K, to_drop, 0, half(t)));
            }
            FilterRule::OnlyType(t) => {
                program.push(insn(LD_H_ABS, 0, 0, TYPE_OFFSET));
                program.push(insn(JEQ_K, 0, to_drop, half(t)));
            }
            FilterRule::DropSender(port) => {
                program.push(insn(LD_W_ABS, 0, 0, PID_OFFSET));
                program.push(insn(JEQ_K, to_drop, 0, u32::from_be_bytes(port.to_ne_bytes())));
            }
            FilterRule::DropNewFdb => {
                program.push(insn(LD_H_ABS, 0, 0, TYPE_OFFSET));
                program.push(insn(JEQ_K, 0, 2, half(libc::RTM_NEWNEIGH)));
                program.push(insn(LD_B_ABS, 0, 0, FAMILY_OFFSET));
                program.push(insn(JEQ_K, to_drop, 0, u32::from(super::AF_BRIDGE)));
            }
        }
    }
    program.push(insn(RET_K, 0, 0, u32::MAX));
    program.push(insn(RET_K, 0, 0, 0));
    program
}
