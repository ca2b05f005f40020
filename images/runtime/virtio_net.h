/*
 * virtio-net driver: receiveq 0, transmitq 1, every frame preceded by the
 * 12-byte virtio_net_hdr_v1.  Fixed 2 KiB buffers, one descriptor each;
 * no offloads, no mergeable buffers.
 */
#ifndef KVMCOLO_VIRTIO_NET_H
#define KVMCOLO_VIRTIO_NET_H

#include "virtio.h"

#define VIRTIO_NET_F_MAC        (1ull << 5)
#define VNET_HDR_LEN            12
#define VNET_MTU_FRAME          1514    /* Ethernet frame without FCS */
#define VNET_BUF_SIZE           2048    /* >= 12 + 1514 */
#define VNET_RX_BUFS            256
#define VNET_TX_BUFS            256

struct vnet {
        struct virtio_dev dev;
        struct virtq rxq, txq;
        u8 mac[6];
        u8 *rx_mem, *tx_mem;            /* VNET_*_BUFS buffers of VNET_BUF_SIZE */
        u16 tx_free[VNET_TX_BUFS];      /* stack of free tx buffer indexes */
        u16 tx_nfree;
        int rx_refilled;                /* rx buffers returned since the last kick */
        u64 rx_frames, tx_frames, tx_drops;
};

/* Set-up; MAC from config if offered, else a random locally administered one. */
int vnet_open(struct vnet *n, const struct virtio_mmio_info *info, const char *who);
/*
 * Next received frame (Ethernet header first), or NULL.  The frame stays
 * valid until vnet_rx_done(n, frame), which gives the buffer back.
 */
u8 *vnet_recv(struct vnet *n, u32 *len);
void vnet_rx_done(struct vnet *n, u8 *frame);
/*
 * A transmit buffer to build a frame of up to VNET_MTU_FRAME bytes in, or
 * NULL if all are in flight (completed ones are reclaimed first).
 */
u8 *vnet_tx_alloc(struct vnet *n);
/* Queues the frame (kicked by vnet_flush). */
void vnet_tx_send(struct vnet *n, u8 *frame, u32 len);
/* Notify the device of new tx frames and rx buffers; call once per batch. */
void vnet_flush(struct vnet *n);
/* Work pending in the rings (received frames). Free: rings are RAM. */
static inline int vnet_rx_pending(const struct vnet *n) { return virtq_has_used(&n->rxq); }

#endif
