/*
 * Ethernet, ARP, IPv4, ICMP echo, UDP and the event loop (see net.h).
 */
#include "net.h"

struct net_stats net_stats;

static struct vnet *nic;
static u32 my_ip, my_mask;
static u64 t0_tsc;
static u16 ip_id;

static const u8 bcast_mac[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

u32 net_ip(void) { return my_ip; }
const u8 *net_mac(void) { return nic->mac; }
u64 net_now_us(void) { return (rdtsc() - t0_tsc) * 1000 / tsc_khz(); }

/* ---- checksums ---- */

u64 csum_add(u64 sum, const u8 *p, u32 len)
{
        /* 16-bit big-endian words; a u64 accumulator never overflows here. */
        for (; len >= 2; p += 2, len -= 2)
                sum += (u32)(p[0] << 8 | p[1]);
        if (len)
                sum += (u32)p[0] << 8;
        return sum;
}

u16 csum_fold(u64 sum)
{
        while (sum >> 16)
                sum = (sum & 0xffff) + (sum >> 16);
        return (u16)~sum;
}

u64 csum_pseudo(u32 src, u32 dst, u8 proto, u32 len)
{
        return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + proto + len;
}

/* ---- ARP cache ---- */

#define ARP_ENTRIES     16
#define ARP_REQ_GAP_US  100000  /* at most one request per destination per 100 ms */

static struct arp_entry {
        u32 ip;                 /* 0 = empty */
        u8 mac[6];
        u64 stamp;              /* last update, net_now_us */
        u64 last_request;       /* for entries still being resolved (mac all 0) */
} arp_cache[ARP_ENTRIES];

static struct arp_entry *arp_lookup(u32 ip)
{
        for (int i = 0; i < ARP_ENTRIES; i++)
                if (arp_cache[i].ip == ip)
                        return &arp_cache[i];
        return 0;
}

/* Existing entry for ip, else the empty or least recently updated one. */
static struct arp_entry *arp_slot(u32 ip)
{
        struct arp_entry *e = arp_lookup(ip), *old = &arp_cache[0];
        if (e)
                return e;
        for (int i = 0; i < ARP_ENTRIES; i++) {
                if (!arp_cache[i].ip)
                        return &arp_cache[i];
                if (arp_cache[i].stamp < old->stamp)
                        old = &arp_cache[i];
        }
        return old;
}

static void arp_learn(u32 ip, const u8 *mac)
{
        if (!ip || ip == my_ip || (mac[0] & 1))
                return;         /* no multicast/broadcast MACs in the cache */
        struct arp_entry *e = arp_slot(ip);
        if (e->ip != ip)
                e->last_request = 0;
        e->ip = ip;
        memcpy(e->mac, mac, 6);
        e->stamp = net_now_us();
}

static void eth_header(u8 *f, const u8 *dst, u16 type)
{
        memcpy(f, dst, 6);
        memcpy(f + 6, nic->mac, 6);
        put16(f + 12, type);
}

static void arp_send(u16 op, const u8 *dst_mac, const u8 *target_mac, u32 target_ip)
{
        u8 *f = vnet_tx_alloc(nic);
        if (!f) {
                net_stats.tx_no_buf++;
                return;
        }
        eth_header(f, dst_mac, ETH_P_ARP);
        u8 *a = f + ETH_HLEN;
        put16(a, 1);                    /* Ethernet */
        put16(a + 2, ETH_P_IP);
        a[4] = 6;
        a[5] = 4;
        put16(a + 6, op);
        memcpy(a + 8, nic->mac, 6);
        put32(a + 14, my_ip);
        memcpy(a + 18, target_mac, 6);
        put32(a + 24, target_ip);
        /* 42 bytes; pad to the Ethernet minimum of 60. */
        memset(a + 28, 0, 18);
        vnet_tx_send(nic, f, 60);
}

static void arp_input(const u8 *f, u32 len)
{
        const u8 *a = f + ETH_HLEN;
        if (len < ETH_HLEN + 28 || get16(a) != 1 || get16(a + 2) != ETH_P_IP ||
            a[4] != 6 || a[5] != 4)
                return;
        u16 op = get16(a + 6);
        u32 sender = get32(a + 14), target = get32(a + 24);
        /* RFC 826: update a known sender; add it if the packet is for us. */
        if (target == my_ip || arp_lookup(sender))
                arp_learn(sender, a + 8);
        if (op == 1 && target == my_ip)
                arp_send(2, a + 8, a + 8, sender);
}

/* ---- IPv4 ---- */

u8 *ip_begin(u32 dst, u8 **l4)
{
        struct arp_entry *e = arp_lookup(dst);
        static const u8 zero[6];
        if (!e || !memcmp(e->mac, zero, 6)) {
                /*
                 * Unknown: ask (rate-limited), drop this packet.  There is
                 * no default gateway: off-link peers are reachable only
                 * through the MAC their packets came from (ip_input learns
                 * it), so asking for them is pointless.
                 */
                if ((dst & my_mask) != (my_ip & my_mask)) {
                        net_stats.tx_no_arp++;
                        return 0;
                }
                u64 now = net_now_us();
                if (!e) {
                        e = arp_slot(dst);
                        e->ip = dst;
                        memset(e->mac, 0, 6);
                        e->stamp = now;
                        e->last_request = 0;
                }
                if (!e->last_request || now - e->last_request >= ARP_REQ_GAP_US) {
                        e->last_request = now ? now : 1;
                        arp_send(1, bcast_mac, zero, dst);
                        net_stats.arp_requests_sent++;
                }
                net_stats.tx_no_arp++;
                return 0;
        }
        u8 *f = vnet_tx_alloc(nic);
        if (!f) {
                net_stats.tx_no_buf++;
                return 0;
        }
        eth_header(f, e->mac, ETH_P_IP);
        *l4 = f + ETH_HLEN + IP_HLEN;
        return f;
}

void ip_send(u8 *f, u32 dst, u8 proto, u32 l4_len)
{
        u8 *ip = f + ETH_HLEN;
        ip[0] = 0x45;
        ip[1] = 0;
        put16(ip + 2, (u16)(IP_HLEN + l4_len));
        put16(ip + 4, ip_id++);
        put16(ip + 6, 0x4000);          /* DF, no fragments */
        ip[8] = 64;
        ip[9] = proto;
        put16(ip + 10, 0);
        put32(ip + 12, my_ip);
        put32(ip + 16, dst);
        put16(ip + 10, csum_fold(csum_add(0, ip, IP_HLEN)));
        u32 len = ETH_HLEN + IP_HLEN + l4_len;
        if (len < 60) {
                memset(f + len, 0, 60 - len);
                len = 60;
        }
        vnet_tx_send(nic, f, len);
}

static void icmp_input(u32 src, const u8 *p, u32 len)
{
        if (len < 8 || p[0] != 8 || p[1] != 0)          /* echo request only */
                return;
        if (csum_fold(csum_add(0, p, len))) {
                net_stats.rx_drop_csum++;
                return;
        }
        u8 *r;
        u8 *f = ip_begin(src, &r);
        if (!f)
                return;
        net_copy(r, p, len);
        r[0] = 0;                       /* echo reply, same id/seq/payload */
        put16(r + 2, 0);
        put16(r + 2, csum_fold(csum_add(0, r, len)));
        ip_send(f, src, IPPROTO_ICMP, len);
}

/* ---- UDP ---- */

#define UDP_PORTS 8
static struct {
        u16 port;
        udp_handler h;
} udp_table[UDP_PORTS];

int udp_bind(u16 port, udp_handler h)
{
        for (int i = 0; i < UDP_PORTS; i++)
                if (!udp_table[i].h) {
                        udp_table[i].port = port;
                        udp_table[i].h = h;
                        return 0;
                }
        return -1;
}

int udp_send(u32 dst, u16 src_port, u16 dst_port, const void *data, u32 len)
{
        if (len > VNET_MTU_FRAME - ETH_HLEN - IP_HLEN - 8)
                return -1;
        u8 *u;
        u8 *f = ip_begin(dst, &u);
        if (!f)
                return -1;
        put16(u, src_port);
        put16(u + 2, dst_port);
        put16(u + 4, (u16)(8 + len));
        put16(u + 6, 0);
        net_copy(u + 8, data, len);
        u16 c = csum_fold(csum_add(csum_pseudo(my_ip, dst, IPPROTO_UDP, 8 + len), u, 8 + len));
        put16(u + 6, c ? c : 0xffff);   /* 0 means "no checksum" in UDP */
        ip_send(f, dst, IPPROTO_UDP, 8 + len);
        return 0;
}

static void udp_input(u32 src, u32 dst, const u8 *p, u32 len)
{
        if (len < 8 || get16(p + 4) < 8 || get16(p + 4) > len)
                return;
        len = get16(p + 4);
        if (get16(p + 6) &&
            csum_fold(csum_add(csum_pseudo(src, dst, IPPROTO_UDP, len), p, len))) {
                net_stats.rx_drop_csum++;
                return;
        }
        u16 dport = get16(p + 2);
        for (int i = 0; i < UDP_PORTS; i++)
                if (udp_table[i].h && udp_table[i].port == dport) {
                        udp_table[i].h(src, get16(p), dport, p + 8, len - 8);
                        return;
                }
        /* Closed port: silently dropped (no ICMP unreachable). */
}

static void ip_input(const u8 *f, u32 len, const u8 *src_mac)
{
        const u8 *ip = f + ETH_HLEN;
        len -= ETH_HLEN;
        if (len < IP_HLEN || (ip[0] >> 4) != 4)
                return;
        u32 hl = (ip[0] & 0xf) * 4u, tot = get16(ip + 2);
        if (hl < IP_HLEN || tot < hl || tot > len) {
                net_stats.rx_drop_other++;
                return;
        }
        if (csum_fold(csum_add(0, ip, hl))) {
                net_stats.rx_drop_csum++;
                return;
        }
        if (get16(ip + 6) & 0x3fff) {           /* MF or an offset: a fragment */
                net_stats.rx_drop_frag++;
                return;
        }
        u32 src = get32(ip + 12), dst = get32(ip + 16);
        if (dst != my_ip)
                return;
        /* Learn where replies go (for off-link peers: the router's MAC). */
        arp_learn(src, src_mac);
        const u8 *p = ip + hl;
        u32 plen = tot - hl;
        switch (ip[9]) {
        case IPPROTO_ICMP: icmp_input(src, p, plen); break;
        case IPPROTO_UDP: udp_input(src, dst, p, plen); break;
        case IPPROTO_TCP: tcp_input(src, dst, p, plen); break;
        }
}

static void eth_input(const u8 *f, u32 len)
{
        net_stats.rx_frames++;
        if (len < ETH_HLEN)
                return;
        if (memcmp(f, nic->mac, 6) && memcmp(f, bcast_mac, 6))
                return;
        switch (get16(f + 12)) {
        case ETH_P_ARP: arp_input(f, len); break;
        case ETH_P_IP: ip_input(f, len, f + 6); break;
        }
}

/* ---- set-up and loop ---- */

void net_init(struct vnet *n, u32 ip, u32 prefix_len)
{
        nic = n;
        my_ip = ip;
        my_mask = prefix_len ? ~0u << (32 - prefix_len) : 0;
        t0_tsc = rdtsc();
        ip_id = (u16)random_u64();
        tcp_init();
        /* Gratuitous ARP: lets peers (and bridges) learn us at once. */
        arp_send(1, bcast_mac, bcast_mac, my_ip);
        vnet_flush(nic);
}

#define RX_BATCH        64
#define BUSY_POLL_US    50

void net_run(void)
{
        struct virtio_dev *dev = &nic->dev;
        u64 last_work = rdtsc(), spin = BUSY_POLL_US * tsc_khz() / 1000;
        for (;;) {
                u64 seen = irq_total();
                int work = 0;
                u32 len;
                u8 *f;
                while (work < RX_BATCH && (f = vnet_recv(nic, &len))) {
                        eth_input(f, len);
                        vnet_rx_done(nic, f);
                        work++;
                }
                work += tcp_poll();
                vnet_flush(nic);
                u64 now = rdtsc();
                if (work || vnet_rx_pending(nic)) {
                        last_work = now;
                        continue;
                }
                if (now - last_work < spin) {
                        cpu_relax();
                        continue;
                }
                virtio_idle(&dev, 1, seen);
        }
}
