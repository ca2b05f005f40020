/*
 * Minimal TCP server side (passive open only), driven by net_run():
 * in-order delivery (out-of-order segments are dropped and rcv_nxt is
 * re-ACKed), receive window = free space of the connection's receive
 * buffer, the peer's window respected, MSS 1460 / the peer's MSS option,
 * go-back-N retransmission from snd_una on an RTO (200 ms, doubling, 12
 * tries), zero-window probes, FIN/RST in every state, a 2 s TIME_WAIT
 * (recycled early when slots run out), RST for unknown connections and ISNs
 * from RDRAND.  No window scaling, SACK, timestamps or urgent data.
 *
 * Applications get callbacks: on_event(c) runs (in the event loop) after
 * a connection is established and whenever data arrived, send space freed
 * up or the peer closed.  It moves data with tcp_read/tcp_write and ends
 * with tcp_close.  It must not block.
 */
#ifndef KVMCOLO_TCP_H
#define KVMCOLO_TCP_H

#include "net.h"

#define TCP_MAX_CONNS   32
#define TCP_RXBUF       32768   /* also the largest window we advertise */
#define TCP_TXBUF       32768
#define TCP_APP_STATE   512     /* per-connection bytes for the application */

struct tcp_conn;
typedef void (*tcp_event_fn)(struct tcp_conn *c);

/* Passive open on port; 0, or -1 if the listener table is full. */
int tcp_listen(u16 port, tcp_event_fn on_event);

u32 tcp_rx_avail(const struct tcp_conn *c);     /* bytes ready to read */
u32 tcp_read(struct tcp_conn *c, void *buf, u32 max);
u32 tcp_tx_space(const struct tcp_conn *c);     /* bytes tcp_write takes now */
u32 tcp_write(struct tcp_conn *c, const void *buf, u32 len);   /* all or part */
/* No more writes; FIN follows the queued data.  The slot is freed by TCP. */
void tcp_close(struct tcp_conn *c);
int tcp_peer_closed(const struct tcp_conn *c);  /* FIN received */
int tcp_closing(const struct tcp_conn *c);      /* tcp_close was called */
u16 tcp_local_port(const struct tcp_conn *c);
/* TCP_APP_STATE zeroed bytes owned by the application. */
void *tcp_app(struct tcp_conn *c);

struct tcp_stats {
        u64 accepted, resets_sent, retransmits, ooo_dropped, csum_dropped, aborted;
};
extern struct tcp_stats tcp_stats;

#endif
