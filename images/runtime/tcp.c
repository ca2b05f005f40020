/*
 * Minimal TCP (server side), see tcp.h.  Sequence space per connection:
 *
 *   snd_una <= snd_nxt <= snd_max: the tx ring holds the unacknowledged
 *   data [snd_una, snd_una + tx_len); our FIN, once sent, is the sequence
 *   number after the last data byte.  A retransmission timeout goes back to
 *   snd_nxt = snd_una (go-back-N); snd_max remembers what was ever sent so
 *   late ACKs for it stay valid.
 *
 *   rcv_nxt: next byte expected; only a segment starting there is accepted
 *   (after trimming data we already have).  The advertised window is the
 *   free space of the rx ring, so its right edge never moves left.
 */
#include "tcp.h"

enum {
        CLOSED = 0, SYN_RCVD, ESTABLISHED, CLOSE_WAIT, LAST_ACK,
        FIN_WAIT_1, FIN_WAIT_2, CLOSING, TIME_WAIT,
};

#define F_FIN   0x01
#define F_SYN   0x02
#define F_RST   0x04
#define F_PSH   0x08
#define F_ACK   0x10

#define TCP_MSS         1460
#define TCP_DEFAULT_MSS 536     /* RFC 1122: when the peer sends no MSS option */
#define RTO_INIT_US     200000
#define RTO_MAX_US      4000000
#define MAX_RETRIES     12      /* ~40 s of silence, then the connection is reset */
#define SYN_RETRIES     5
#define TIME_WAIT_US    2000000 /* short 2MSL: these are test guests */
#define FIN_WAIT_2_US   30000000

#define seq_lt(a, b)    ((int)((a) - (b)) < 0)
#define seq_le(a, b)    ((int)((a) - (b)) <= 0)
#define seq_gt(a, b)    ((int)((a) - (b)) > 0)

struct tcp_conn {
        u8 state;
        u8 ack_now;             /* send an ACK in this round */
        u8 wake;                /* call the application */
        u8 close_req;           /* application closed: FIN after the data */
        u8 fin_sent, fin_acked, fin_rcvd;
        u8 force_probe;         /* RTO fired: send >= 1 byte even into a zero window */
        u8 dupacks;             /* duplicate ACKs owed for out-of-order segments */
        u16 lport, rport, mss;
        u32 rip;
        tcp_event_fn on_event;
        u32 iss, snd_una, snd_nxt, snd_max, snd_wnd, snd_wl1, snd_wl2;
        u32 irs, rcv_nxt, rcv_adv;
        u8 *rx, *tx;
        u32 rx_head, rx_len, tx_head, tx_len;
        u64 rto_deadline;       /* net_now_us; 0 = not armed */
        u64 end_deadline;       /* TIME_WAIT / FIN_WAIT_2 end; 0 = none */
        u32 rto, retries;
        u64 app[TCP_APP_STATE / 8];
};

struct tcp_stats tcp_stats;
static struct tcp_conn conns[TCP_MAX_CONNS];

#define MAX_LISTEN 8
static struct {
        u16 port;
        tcp_event_fn fn;
} listeners[MAX_LISTEN];

void tcp_init(void)
{
        for (int i = 0; i < TCP_MAX_CONNS; i++) {
                conns[i].rx = ram_alloc(TCP_RXBUF);
                conns[i].tx = ram_alloc(TCP_TXBUF);
        }
}

int tcp_listen(u16 port, tcp_event_fn fn)
{
        for (int i = 0; i < MAX_LISTEN; i++)
                if (!listeners[i].fn) {
                        listeners[i].port = port;
                        listeners[i].fn = fn;
                        return 0;
                }
        return -1;
}

/* ---- application side ---- */

u32 tcp_rx_avail(const struct tcp_conn *c) { return c->rx_len; }
u32 tcp_tx_space(const struct tcp_conn *c) { return c->close_req ? 0 : TCP_TXBUF - c->tx_len; }
int tcp_peer_closed(const struct tcp_conn *c) { return c->fin_rcvd; }
int tcp_closing(const struct tcp_conn *c) { return c->close_req; }
u16 tcp_local_port(const struct tcp_conn *c) { return c->lport; }
void *tcp_app(struct tcp_conn *c) { return c->app; }

static u32 min32(u32 a, u32 b) { return a < b ? a : b; }

u32 tcp_read(struct tcp_conn *c, void *buf, u32 max)
{
        u32 n = min32(max, c->rx_len), first = min32(n, TCP_RXBUF - c->rx_head);
        net_copy(buf, c->rx + c->rx_head, first);
        net_copy((u8 *)buf + first, c->rx, n - first);
        c->rx_head = (c->rx_head + n) % TCP_RXBUF;
        c->rx_len -= n;
        return n;       /* a window update goes out from tcp_output if due */
}

u32 tcp_write(struct tcp_conn *c, const void *buf, u32 len)
{
        u32 n = min32(len, tcp_tx_space(c));
        u32 tail = (c->tx_head + c->tx_len) % TCP_TXBUF, first = min32(n, TCP_TXBUF - tail);
        net_copy(c->tx + tail, buf, first);
        net_copy(c->tx, (const u8 *)buf + first, n - first);
        c->tx_len += n;
        return n;
}

void tcp_close(struct tcp_conn *c)
{
        c->close_req = 1;
}

/* ---- segment output ---- */

static u32 rcv_wnd(const struct tcp_conn *c)
{
        return min32(TCP_RXBUF - c->rx_len, 65535);
}

/* Writes the 20-byte header (+ MSS option if SYN) and sends. 0 or -1. */
static int send_raw(u32 dst, u16 sport, u16 dport, u32 seq, u32 ack, u8 flags, u16 wnd,
                    const u8 *d1, u32 n1, const u8 *d2, u32 n2)
{
        u8 *t;
        u8 *f = ip_begin(dst, &t);
        if (!f)
                return -1;
        u32 hl = (flags & F_SYN) ? 24 : 20, len = hl + n1 + n2;
        put16(t, sport);
        put16(t + 2, dport);
        put32(t + 4, seq);
        put32(t + 8, ack);
        t[12] = (u8)((hl / 4) << 4);
        t[13] = flags;
        put16(t + 14, wnd);
        put32(t + 16, 0);               /* checksum, urgent pointer */
        if (flags & F_SYN) {
                t[20] = 2;              /* MSS option */
                t[21] = 4;
                put16(t + 22, TCP_MSS);
        }
        net_copy(t + hl, d1, n1);
        net_copy(t + hl + n1, d2, n2);
        put16(t + 16, csum_fold(csum_add(csum_pseudo(net_ip(), dst, IPPROTO_TCP, len), t, len)));
        ip_send(f, dst, IPPROTO_TCP, len);
        return 0;
}

/* A segment of c carrying tx-ring bytes [off, off + n) relative to snd_una. */
static int send_seg(struct tcp_conn *c, u32 seq, u8 flags, u32 off, u32 n)
{
        u32 pos = (c->tx_head + off) % TCP_TXBUF, first = min32(n, TCP_TXBUF - pos);
        u32 wnd = rcv_wnd(c);
        u32 ack = (flags & F_ACK) ? c->rcv_nxt : 0;
        if (send_raw(c->rip, c->lport, c->rport, seq, ack, flags, (u16)wnd,
                     c->tx + pos, first, c->tx, n - first))
                return -1;
        if (flags & F_ACK) {
                c->rcv_adv = c->rcv_nxt + wnd;
                c->ack_now = 0;
        }
        return 0;
}

static void send_rst_for(u32 src, const u8 *seg, u32 seg_len)
{
        u8 flags = seg[13];
        if (flags & F_RST)
                return;
        tcp_stats.resets_sent++;
        if (flags & F_ACK)
                send_raw(src, get16(seg + 2), get16(seg), get32(seg + 8), 0, F_RST, 0, 0, 0, 0, 0);
        else
                send_raw(src, get16(seg + 2), get16(seg), 0, get32(seg + 4) + seg_len,
                         F_RST | F_ACK, 0, 0, 0, 0, 0);
}

static void conn_free(struct tcp_conn *c)
{
        c->state = CLOSED;
}

static void arm_rto(struct tcp_conn *c)
{
        if (!c->rto_deadline)
                c->rto_deadline = net_now_us() + c->rto;
}

static void enter_time_wait(struct tcp_conn *c)
{
        c->state = TIME_WAIT;
        c->rto_deadline = 0;
        c->end_deadline = net_now_us() + TIME_WAIT_US;
}

/* Sends what is due for c; returns the number of segments sent. */
static int tcp_output(struct tcp_conn *c)
{
        int sent = 0;
        if (c->state == SYN_RCVD) {
                if (c->ack_now && !send_seg(c, c->iss, F_SYN | F_ACK, 0, 0)) {
                        arm_rto(c);
                        sent++;
                }
                return sent;
        }
        for (; c->dupacks; c->dupacks--)
                if (!send_seg(c, c->snd_nxt, F_ACK, 0, 0))
                        sent++;
        int can_send = c->state == ESTABLISHED || c->state == CLOSE_WAIT ||
                       c->state == FIN_WAIT_1 || c->state == CLOSING || c->state == LAST_ACK;
        while (can_send && !c->fin_sent) {
                u32 off = c->snd_nxt - c->snd_una;
                if (off < c->tx_len) {
                        u32 right = c->snd_una + c->snd_wnd;
                        u32 room = seq_lt(c->snd_nxt, right) ? right - c->snd_nxt : 0;
                        u32 n = min32(min32(c->tx_len - off, room), c->mss);
                        if (!n) {
                                if (!c->force_probe) {
                                        arm_rto(c);     /* persist timer */
                                        break;
                                }
                                n = 1;                  /* zero-window probe */
                        }
                        u8 fl = F_ACK | (off + n == c->tx_len ? F_PSH : 0);
                        if (send_seg(c, c->snd_nxt, fl, off, n))
                                break;                  /* no buffer: next round */
                        c->force_probe = 0;
                        c->snd_nxt += n;
                        if (seq_gt(c->snd_nxt, c->snd_max))
                                c->snd_max = c->snd_nxt;
                        arm_rto(c);
                        sent++;
                        continue;
                }
                if (c->close_req) {
                        if (send_seg(c, c->snd_nxt, F_FIN | F_ACK, 0, 0))
                                break;
                        c->force_probe = 0;
                        c->fin_sent = 1;
                        c->snd_nxt++;
                        if (seq_gt(c->snd_nxt, c->snd_max))
                                c->snd_max = c->snd_nxt;
                        if (c->state == ESTABLISHED)
                                c->state = FIN_WAIT_1;
                        else if (c->state == CLOSE_WAIT)
                                c->state = LAST_ACK;
                        arm_rto(c);
                        sent++;
                }
                break;
        }
        /* Window update once the app freed a worthwhile amount of rx space. */
        u32 thresh = min32(2 * TCP_MSS, TCP_RXBUF / 2);
        if (!c->fin_rcvd && c->state != TIME_WAIT &&
            (int)(c->rcv_nxt + rcv_wnd(c) - c->rcv_adv) >= (int)thresh)
                c->ack_now = 1;
        if (c->ack_now && !send_seg(c, c->snd_nxt, F_ACK, 0, 0))
                sent++;
        return sent;
}

/* ---- segment input ---- */

static struct tcp_conn *conn_find(u32 rip, u16 rport, u16 lport)
{
        for (int i = 0; i < TCP_MAX_CONNS; i++) {
                struct tcp_conn *c = &conns[i];
                if (c->state != CLOSED && c->rip == rip && c->rport == rport && c->lport == lport)
                        return c;
        }
        return 0;
}

/* A free slot, else the TIME_WAIT connection closest to its end. */
static struct tcp_conn *conn_alloc(void)
{
        struct tcp_conn *tw = 0;
        for (int i = 0; i < TCP_MAX_CONNS; i++) {
                struct tcp_conn *c = &conns[i];
                if (c->state == CLOSED)
                        return c;
                if (c->state == TIME_WAIT && (!tw || c->end_deadline < tw->end_deadline))
                        tw = c;
        }
        return tw;
}

static u16 parse_mss(const u8 *seg, u32 hl)
{
        u16 mss = TCP_DEFAULT_MSS;
        for (u32 i = 20; i < hl;) {
                u8 kind = seg[i];
                if (kind == 0)
                        break;
                if (kind == 1) {
                        i++;
                        continue;
                }
                if (i + 1 >= hl || seg[i + 1] < 2 || i + seg[i + 1] > hl)
                        break;
                if (kind == 2 && seg[i + 1] == 4)
                        mss = get16(seg + i + 2);
                i += seg[i + 1];
        }
        if (mss > TCP_MSS)
                mss = TCP_MSS;
        if (mss < 64)
                mss = 64;
        return mss;
}

static void listen_input(u32 src, const u8 *seg, u32 hl, u32 seg_len)
{
        u8 flags = seg[13];
        u16 lport = get16(seg + 2);
        if (flags & F_RST)
                return;
        if ((flags & F_ACK) || !(flags & F_SYN)) {
                send_rst_for(src, seg, seg_len);
                return;
        }
        tcp_event_fn fn = 0;
        for (int i = 0; i < MAX_LISTEN; i++)
                if (listeners[i].fn && listeners[i].port == lport)
                        fn = listeners[i].fn;
        if (!fn) {
                send_rst_for(src, seg, seg_len);
                return;
        }
        struct tcp_conn *c = conn_alloc();
        if (!c)
                return;         /* all busy: the peer retries its SYN */
        u8 *rx = c->rx, *tx = c->tx;
        memset(c, 0, sizeof(*c));
        c->rx = rx;
        c->tx = tx;
        c->state = SYN_RCVD;
        c->rip = src;
        c->rport = get16(seg);
        c->lport = lport;
        c->on_event = fn;
        c->mss = parse_mss(seg, hl);
        c->irs = get32(seg + 4);
        c->rcv_nxt = c->irs + 1;
        /* Random ISN: two copies of one guest must not agree on it. */
        c->iss = (u32)random_u64();
        c->snd_una = c->iss;
        c->snd_nxt = c->snd_max = c->iss + 1;
        c->snd_wnd = get16(seg + 14);
        c->rto = RTO_INIT_US;
        c->ack_now = 1;                 /* the SYN-ACK */
        tcp_stats.accepted++;
}

static void process_ack(struct tcp_conn *c, u32 seq, u32 ack, u32 wnd)
{
        if (seq_gt(ack, c->snd_max)) {
                c->ack_now = 1;         /* acks what we never sent */
                return;
        }
        if (seq_lt(ack, c->snd_una))
                return;                 /* old duplicate */
        c->retries = 0;                 /* the peer is alive */
        if (seq_gt(ack, c->snd_una)) {
                u32 acked = ack - c->snd_una, data = min32(acked, c->tx_len);
                c->tx_head = (c->tx_head + data) % TCP_TXBUF;
                c->tx_len -= data;
                c->snd_una = ack;
                if (acked > data)
                        c->fin_sent = c->fin_acked = 1;
                if (seq_lt(c->snd_nxt, ack))
                        c->snd_nxt = ack;
                c->rto = RTO_INIT_US;
                c->rto_deadline = 0;
                if (c->snd_nxt != c->snd_una)
                        arm_rto(c);
                c->wake = 1;            /* send space freed */
        }
        if (seq_lt(c->snd_wl1, seq) || (c->snd_wl1 == seq && seq_le(c->snd_wl2, ack))) {
                if (wnd > c->snd_wnd)
                        c->wake = 1;
                c->snd_wnd = wnd;
                c->snd_wl1 = seq;
                c->snd_wl2 = ack;
        }
        if (c->fin_acked) {
                if (c->state == FIN_WAIT_1) {
                        c->state = FIN_WAIT_2;
                        c->end_deadline = net_now_us() + FIN_WAIT_2_US;
                } else if (c->state == CLOSING) {
                        enter_time_wait(c);
                } else if (c->state == LAST_ACK) {
                        conn_free(c);
                }
        }
}

void tcp_input(u32 src, u32 dst, const u8 *seg, u32 len)
{
        if (len < 20)
                return;
        u32 hl = (seg[12] >> 4) * 4u;
        if (hl < 20 || hl > len)
                return;
        if (csum_fold(csum_add(csum_pseudo(src, dst, IPPROTO_TCP, len), seg, len))) {
                tcp_stats.csum_dropped++;
                return;
        }
        u8 flags = seg[13];
        u32 seq = get32(seg + 4), ack = get32(seg + 8), wnd = get16(seg + 14);
        const u8 *data = seg + hl;
        u32 dlen = len - hl;
        int fin = flags & F_FIN;
        u32 seg_len = dlen + !!(flags & F_SYN) + !!fin;

        struct tcp_conn *c = conn_find(src, get16(seg), get16(seg + 2));
        if (c && c->state == TIME_WAIT && (flags & F_SYN) && !(flags & (F_ACK | F_RST))) {
                conn_free(c);           /* the same 4-tuple reused: a new connection */
                c = 0;
        }
        if (!c) {
                listen_input(src, seg, hl, seg_len);
                return;
        }

        if (c->state == SYN_RCVD) {
                if (flags & F_RST) {
                        if (seq == c->rcv_nxt)
                                conn_free(c);
                        return;
                }
                if (flags & F_SYN) {
                        if (seq == c->irs)
                                c->ack_now = 1; /* our SYN-ACK got lost */
                        return;
                }
                if (!(flags & F_ACK))
                        return;
                if (ack != c->iss + 1) {
                        send_rst_for(src, seg, seg_len);
                        return;
                }
                c->state = ESTABLISHED;
                c->snd_una = ack;
                c->snd_wnd = wnd;
                c->snd_wl1 = seq;
                c->snd_wl2 = ack;
                c->rto_deadline = 0;
                c->retries = 0;
                c->wake = 1;            /* tell the application */
        }

        if (c->state == TIME_WAIT) {
                if (flags & F_RST) {
                        conn_free(c);
                } else if (fin) {
                        c->ack_now = 1; /* our last ACK got lost: again, restart 2MSL */
                        c->end_deadline = net_now_us() + TIME_WAIT_US;
                }
                return;
        }

        if (flags & F_RST) {
                u32 w = rcv_wnd(c);
                if (seq_le(c->rcv_nxt, seq) && seq_lt(seq, c->rcv_nxt + (w ? w : 1)))
                        conn_free(c);
                return;
        }
        if (flags & F_SYN) {
                c->ack_now = 1;         /* RFC 5961 challenge ACK; drop */
                return;
        }

        /* In-order only: trim what we already have, drop what is ahead. */
        if (seq_lt(seq, c->rcv_nxt)) {
                u32 d = c->rcv_nxt - seq;
                if (d > dlen) {
                        /*
                         * Entirely old: a retransmission, or a zero-window
                         * probe / keepalive (Linux sends those at
                         * snd_una - 1 without data).  All want an ACK.
                         */
                        c->ack_now = 1;
                        dlen = 0;
                        fin = 0;
                } else {
                        data += d;
                        dlen -= d;
                        if (!dlen && !fin && d)
                                c->ack_now = 1;
                }
                seq = c->rcv_nxt;
        } else if (seq != c->rcv_nxt) {
                /*
                 * Out of order.  Its data is dropped and rcv_nxt re-ACKed
                 * (duplicate ACKs make the peer retransmit quickly), but
                 * inside our window its ACK field still counts: the peer
                 * may be acknowledging what we are about to retransmit.
                 */
                /* Up to and including the right edge: a sender that filled
                 * our window sends its pure ACKs with seq == that edge. */
                if ((flags & F_ACK) && seq_le(seq, c->rcv_nxt + rcv_wnd(c)))
                        process_ack(c, seq, ack, wnd);
                if (c->state != CLOSED && (dlen || fin)) {
                        /*
                         * One duplicate ACK per dropped segment: three make
                         * the peer fast-retransmit (there is no SACK).  They
                         * go out together from tcp_output, after the
                         * application ran, so they all carry the same window
                         * (Linux ignores "dupacks" that change the window).
                         */
                        tcp_stats.ooo_dropped++;
                        if (c->dupacks < 8)
                                c->dupacks++;
                }
                return;
        }
        if (!(flags & F_ACK))
                return;
        process_ack(c, seq, ack, wnd);
        if (c->state == CLOSED)
                return;

        int receiving = c->state == ESTABLISHED || c->state == FIN_WAIT_1 ||
                        c->state == FIN_WAIT_2;
        if (dlen && receiving) {
                u32 take;
                if (c->close_req) {
                        take = dlen;    /* the application will not read: discard */
                } else {
                        take = min32(dlen, TCP_RXBUF - c->rx_len);
                        u32 tail = (c->rx_head + c->rx_len) % TCP_RXBUF;
                        u32 first = min32(take, TCP_RXBUF - tail);
                        net_copy(c->rx + tail, data, first);
                        net_copy(c->rx, data + first, take - first);
                        c->rx_len += take;
                }
                c->rcv_nxt += take;
                if (take < dlen)
                        fin = 0;        /* beyond our window: the FIN comes again */
                c->ack_now = 1;
                c->wake = 1;
        }
        if (fin && receiving) {
                c->rcv_nxt++;
                c->fin_rcvd = 1;
                c->ack_now = 1;
                c->wake = 1;
                if (c->state == ESTABLISHED)
                        c->state = CLOSE_WAIT;
                else if (c->state == FIN_WAIT_1)
                        c->state = CLOSING;     /* our FIN not acked yet */
                else
                        enter_time_wait(c);
        }
}

/* ---- timers, application callbacks and output, once per loop round ---- */

int tcp_poll(void)
{
        int sent = 0;
        u64 now = net_now_us();
        for (int i = 0; i < TCP_MAX_CONNS; i++) {
                struct tcp_conn *c = &conns[i];
                if (c->state == CLOSED)
                        continue;
                if (c->end_deadline && now >= c->end_deadline &&
                    (c->state == TIME_WAIT || c->state == FIN_WAIT_2)) {
                        conn_free(c);
                        continue;
                }
                if (c->rto_deadline && now >= c->rto_deadline) {
                        c->rto_deadline = 0;
                        if (++c->retries > (c->state == SYN_RCVD ? SYN_RETRIES : MAX_RETRIES)) {
                                if (c->state != SYN_RCVD)
                                        send_seg(c, c->snd_nxt, F_RST | F_ACK, 0, 0);
                                tcp_stats.aborted++;
                                conn_free(c);
                                continue;
                        }
                        c->rto = c->rto * 2 > RTO_MAX_US ? RTO_MAX_US : c->rto * 2;
                        if (c->state == SYN_RCVD) {
                                c->ack_now = 1;
                        } else {
                                if (c->snd_nxt != c->snd_una) {
                                        tcp_stats.retransmits++;
                                        c->snd_nxt = c->snd_una;        /* go back N */
                                        if (!c->fin_acked)
                                                c->fin_sent = 0;
                                }
                                c->force_probe = 1;
                        }
                        arm_rto(c);
                }
                if (c->wake && c->state != SYN_RCVD) {
                        c->wake = 0;
                        c->on_event(c);
                }
                sent += tcp_output(c);
        }
        return sent;
}
