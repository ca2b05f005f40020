/*
 * netsrv: network services on the first virtio-net device (the VMM's
 * networking test and COLO workload).  Everything runs at CPL3 in one event
 * loop on the BSP (runtime/net.c, runtime/tcp.c).
 *   ip=A.B.C.D   our address (required)
 *   mask=N       prefix length (24)
 *   echo=P       TCP echo port (7)
 *   udp=P        UDP echo port (7)
 *   counter=P    TCP counter service port (9000)
 *   http=P       HTTP/1.0 port (80)
 *   diverge=N    0 = off; N > 0: counter replies whose value n is a
 *                multiple of N carry a random suffix (below) (0)
 *   log=1        journal every counter value to the first virtio-blk disk
 *                before replying: sector n % capacity holds
 *                "netsrv counter=<n>\n" (zero-padded to 512 bytes), so what
 *                a client was told is on the disk (0)
 * A port of 0 disables that service.  Also answers ARP and ICMP echo.
 *
 * Counter: one global 64-bit counter (netsrv_state.counter), incremented
 * once per request, first reply 1.  TCP service: every request line (bytes
 * up to and including '\n'; a final line without '\n' is ignored) gets the
 * reply "<n>\n", n in decimal.  HTTP: "GET /counter" gets
 *   HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: L\r\n\r\n<n>\n
 * and the connection is closed; other paths get 404, malformed requests or
 * methods other than GET get 400.  The reply text depends only on the
 * counter, except with diverge=N: when n % N == 0 the reply body is
 *   "<n> <16 lowercase hex digits of one RDRAND value>\n"
 * (decimal n, one space, exactly 16 hex digits, newline; for HTTP the
 * Content-Length counts the suffix) -- so two copies of the guest diverge
 * exactly there.
 *
 * Prints "netsrv: ready ip=... mac=... echo=7 udp=7 counter=9000 http=80"
 * and runs until the VMM stops it.  No virtio-net device: exit 2.
 */
#include "guest.h"
#include "tcp.h"
#include "virtio_blk.h"

GUEST_PARAMS("ip", "mask", "echo", "udp", "counter", "http", "diverge", "log");

static struct vblk log_disk;
static int log_on;
static char *log_sector;                /* DMA buffer: one sector */

static void log_value(u64 n)
{
        if (!log_on)
                return;
        for (int i = 0; i < 512; i++)
                log_sector[i] = 0;
        snprintf(log_sector, 512, "netsrv counter=%llu\n", n);
        int st = vblk_write(&log_disk, n % log_disk.capacity, log_sector, 512);
        if (st != VIRTIO_BLK_S_OK) {
                printf("netsrv: FAIL log write of %llu: status %d\n", n, st);
                guest_exit(EXIT_FAIL);
        }
}

/* For a VMM that wants to look (ELF symbol `netsrv_state`). */
struct netsrv_state {
        u64 magic;                      /* "KVMCNSRV" */
        volatile u64 counter;           /* last value handed out */
        volatile u64 tcp_lines, http_requests, udp_echoes;
};
struct netsrv_state netsrv_state __attribute__((used, aligned(64))) = {
        .magic = 0x5652534e434d564bull,
};

static u64 diverge;
static u16 port_echo, port_udp, port_counter, port_http;
static struct vnet nic;

/* Bumps the counter; writes the reply body "<n>\n" (or the diverge form). */
static u32 counter_reply(char *buf)
{
        u64 n = ++netsrv_state.counter;
        log_value(n);
        int len = snprintf(buf, 24, "%llu", n);
        if (diverge && n % diverge == 0)
                len += snprintf(buf + len, 24, " %016llx", random_u64());
        buf[len++] = '\n';
        return (u32)len;
}
#define COUNTER_REPLY_MAX 40    /* 20 digits + ' ' + 16 hex + '\n' < 40 */

/* ---- TCP echo ---- */

static void echo_event(struct tcp_conn *c)
{
        u8 tmp[2048];
        u32 n;
        while ((n = tcp_rx_avail(c)) && tcp_tx_space(c)) {
                if (n > tcp_tx_space(c))
                        n = tcp_tx_space(c);
                if (n > sizeof(tmp))
                        n = sizeof(tmp);
                tcp_read(c, tmp, n);
                tcp_write(c, tmp, n);
        }
        /* Flow control: unread bytes stay in the rx buffer and shrink the window. */
        if (tcp_peer_closed(c) && !tcp_rx_avail(c) && !tcp_closing(c))
                tcp_close(c);
}

/* ---- counter ---- */

static void counter_event(struct tcp_conn *c)
{
        if (tcp_closing(c))
                return;
        char tmp[1024], reply[COUNTER_REPLY_MAX];
        /* Read only as many bytes as there is reply space for if all were '\n'. */
        for (;;) {
                u32 n = tcp_tx_space(c) / COUNTER_REPLY_MAX;
                if (n > tcp_rx_avail(c))
                        n = tcp_rx_avail(c);
                if (n > sizeof(tmp))
                        n = sizeof(tmp);
                if (!n)
                        break;
                tcp_read(c, tmp, n);
                for (u32 i = 0; i < n; i++)
                        if (tmp[i] == '\n') {
                                tcp_write(c, reply, counter_reply(reply));
                                netsrv_state.tcp_lines++;
                        }
        }
        if (tcp_peer_closed(c) && !tcp_rx_avail(c))
                tcp_close(c);
}

/* ---- HTTP/1.0 ---- */

struct http_conn {
        u32 line_len;                   /* bytes of the current line so far */
        u32 total;                      /* request bytes so far */
        int in_headers;                 /* request line done */
        int bad;                        /* request line too long */
        char req[256];                  /* the request line */
};

static void http_respond(struct tcp_conn *c, struct http_conn *h)
{
        char body[COUNTER_REPLY_MAX], head[160];
        const char *status = "400 Bad Request";
        u32 blen;
        char *sp1 = 0, *sp2 = 0;
        for (char *p = h->req; *p; p++)
                if (*p == ' ') {
                        if (!sp1)
                                sp1 = p;
                        else if (!sp2)
                                sp2 = p;
                }
        if (!h->bad && h->in_headers && sp1 && sp2 && sp1 - h->req == 3 &&
            !strncmp(h->req, "GET", 3) && !strncmp(sp2 + 1, "HTTP/", 5)) {
                *sp2 = 0;
                if (!strcmp(sp1 + 1, "/counter")) {
                        status = "200 OK";
                        blen = counter_reply(body);
                        netsrv_state.http_requests++;
                } else {
                        status = "404 Not Found";
                        blen = (u32)snprintf(body, sizeof(body), "not found\n");
                }
        } else {
                blen = (u32)snprintf(body, sizeof(body), "bad request\n");
        }
        u32 hlen = (u32)snprintf(head, sizeof(head),
                                 "HTTP/1.0 %s\r\nContent-Type: text/plain\r\n"
                                 "Content-Length: %u\r\n\r\n", status, blen);
        /* The tx buffer is empty: nothing was written on this connection yet. */
        tcp_write(c, head, hlen);
        tcp_write(c, body, blen);
        tcp_close(c);
}

static void http_event(struct tcp_conn *c)
{
        if (tcp_closing(c))
                return;
        struct http_conn *h = tcp_app(c);
        char tmp[512];
        u32 n;
        while ((n = tcp_read(c, tmp, sizeof(tmp)))) {
                for (u32 i = 0; i < n; i++) {
                        char ch = tmp[i];
                        h->total++;
                        if (ch == '\n') {
                                if (h->in_headers && h->line_len == 0) {
                                        http_respond(c, h);     /* blank line: done */
                                        return;
                                }
                                if (!h->in_headers)
                                        h->req[h->line_len < sizeof(h->req) ? h->line_len
                                                                             : sizeof(h->req) - 1] = 0;
                                h->in_headers = 1;
                                h->line_len = 0;
                        } else if (ch != '\r') {
                                if (!h->in_headers) {
                                        if (h->line_len < sizeof(h->req) - 1)
                                                h->req[h->line_len] = ch;
                                        else
                                                h->bad = 1;
                                }
                                h->line_len++;
                        }
                }
                if (h->bad || h->total > 16384) {
                        h->bad = 1;
                        http_respond(c, h);
                        return;
                }
        }
        if (tcp_peer_closed(c)) {
                if (h->total)
                        http_respond(c, h);     /* incomplete request */
                else
                        tcp_close(c);
        }
}

/* ---- UDP echo ---- */

static void udp_echo(u32 src, u16 sport, u16 dport, const u8 *data, u32 len)
{
        netsrv_state.udp_echoes++;
        udp_send(src, dport, sport, data, len);
}

/* ---- start-up ---- */

static int parse_ip(const char *s, u32 *ip)
{
        u32 v = 0;
        for (int part = 0; part < 4; part++) {
                u32 x = 0;
                int digits = 0;
                while (*s >= '0' && *s <= '9' && digits < 4) {
                        x = x * 10 + (u32)(*s++ - '0');
                        digits++;
                }
                if (!digits || x > 255)
                        return -1;
                v = v << 8 | x;
                if (part < 3 && *s++ != '.')
                        return -1;
        }
        if (*s)
                return -1;
        *ip = v;
        return 0;
}

static u16 port_arg(const char *key, u64 dflt)
{
        u64 p = arg_u64(key, dflt);
        if (p > 65535) {
                printf("netsrv: %s=%llu is not a port\n", key, p);
                guest_exit(EXIT_BADARGS);
        }
        return (u16)p;
}

int main(void)
{
        const char *ip_s = arg_str("ip", 0);
        u32 ip;
        if (!ip_s) {
                puts("netsrv: ip=A.B.C.D is required");
                return EXIT_BADARGS;
        }
        if (parse_ip(ip_s, &ip)) {
                printf("netsrv: bad ip '%s'\n", ip_s);
                return EXIT_BADARGS;
        }
        u64 mask = arg_u64("mask", 24);
        if (mask > 32) {
                printf("netsrv: mask=%llu must be a prefix length 0..32\n", mask);
                return EXIT_BADARGS;
        }
        port_echo = port_arg("echo", 7);
        port_udp = port_arg("udp", 7);
        port_counter = port_arg("counter", 9000);
        port_http = port_arg("http", 80);
        diverge = arg_u64("diverge", 0);

        const struct virtio_mmio_info *info = virtio_find(VIRTIO_ID_NET, 0);
        if (!info) {
                puts("netsrv: no virtio-net device");
                return EXIT_BADARGS;
        }
        if (vnet_open(&nic, info, "netsrv"))
                return EXIT_FAIL;
        if (arg_u64("log", 0)) {
                const struct virtio_mmio_info *disk = virtio_find(VIRTIO_ID_BLK, 0);
                if (!disk) {
                        puts("netsrv: log=1 needs a virtio-blk device");
                        return EXIT_BADARGS;
                }
                if (vblk_open(&log_disk, disk, "netsrv"))
                        return EXIT_FAIL;
                log_sector = ram_alloc(512);
                log_on = 1;
        }
        net_init(&nic, ip, (u32)mask);
        if (port_echo)
                tcp_listen(port_echo, echo_event);
        if (port_counter)
                tcp_listen(port_counter, counter_event);
        if (port_http)
                tcp_listen(port_http, http_event);
        if (port_udp)
                udp_bind(port_udp, udp_echo);
        const u8 *m = net_mac();
        printf("netsrv: ready ip=%u.%u.%u.%u mac=%02x:%02x:%02x:%02x:%02x:%02x "
               "echo=%u udp=%u counter=%u http=%u\n",
               ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255,
               m[0], m[1], m[2], m[3], m[4], m[5],
               port_echo, port_udp, port_counter, port_http);
        net_run();
}
