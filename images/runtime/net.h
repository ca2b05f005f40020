/*
 * Minimal IPv4 stack over one virtio-net device, run at CPL3 by a single
 * event loop on the BSP: Ethernet, ARP (cache + requests), IPv4 (checksum
 * verified, fragments dropped, TTL 64), ICMP echo, UDP sockets by port,
 * and TCP (tcp.h).  Addresses are u32 in host byte order (10.0.2.15 =
 * 0x0a00020f); packets are in network order.
 */
#ifndef KVMCOLO_NET_H
#define KVMCOLO_NET_H

#include "virtio_net.h"

#define ETH_HLEN        14
#define IP_HLEN         20
#define ETH_P_IP        0x0800
#define ETH_P_ARP       0x0806
#define IPPROTO_ICMP    1
#define IPPROTO_TCP     6
#define IPPROTO_UDP     17

/* ---- byte order helpers ---- */
static inline u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline u32 get32(const u8 *p)
{
        return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3];
}
static inline void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static inline void put32(u8 *p, u32 v)
{
        p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v;
}

/* Internet checksum: accumulate with csum_add (even offsets), then fold. */
u64 csum_add(u64 sum, const u8 *p, u32 len);
u16 csum_fold(u64 sum);
/* Pseudo-header sum for TCP/UDP. */
u64 csum_pseudo(u32 src, u32 dst, u8 proto, u32 len);

/* Copy with rep movsb: native and fast at CPL3. */
static inline void net_copy(void *d, const void *s, size_t n)
{
        __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}

/* ---- set-up and the event loop ---- */
void net_init(struct vnet *nic, u32 ip, u32 prefix_len);
u32 net_ip(void);
const u8 *net_mac(void);
/* Microseconds since net_init (rdtsc). */
u64 net_now_us(void);
/*
 * Runs forever: receives and dispatches frames in batches, runs the TCP
 * timers and services, flushes transmits, busy-polls ~50 us after the last
 * work and then sleeps on the NIC interrupt / 100 Hz timer.
 */
void net_run(void) __attribute__((noreturn));

/* ---- IP output ----
 * ip_begin returns a transmit frame with the Ethernet and IPv4 headers to
 * be filled in by ip_send and *l4 pointing at the payload, or NULL when no
 * buffer is free or the destination's MAC is unknown (then an ARP request
 * goes out; the caller drops the packet and relies on retransmission).
 */
u8 *ip_begin(u32 dst, u8 **l4);
void ip_send(u8 *frame, u32 dst, u8 proto, u32 l4_len);

/* ---- UDP ---- */
typedef void (*udp_handler)(u32 src_ip, u16 src_port, u16 dst_port, const u8 *data, u32 len);
int udp_bind(u16 port, udp_handler h);          /* 0, or -1 if the table is full */
int udp_send(u32 dst, u16 src_port, u16 dst_port, const void *data, u32 len);

/* ---- TCP hooks used by net.c (tcp.c) ---- */
void tcp_input(u32 src, u32 dst, const u8 *seg, u32 len);
int tcp_poll(void);             /* timers, services, output; non-zero if it sent */
void tcp_init(void);

/* Counters for debugging. */
struct net_stats {
        u64 rx_frames, rx_drop_csum, rx_drop_frag, rx_drop_other;
        u64 arp_requests_sent, tx_no_buf, tx_no_arp;
};
extern struct net_stats net_stats;

#endif
