/*
 * virtio-net.  Buffers are fixed 2 KiB slots in two arrays, so a frame
 * pointer maps back to its slot by arithmetic and the virtqueue token is
 * just the slot's address.
 */
#include "virtio_net.h"

static u8 *rx_slot(struct vnet *n, u32 i) { return n->rx_mem + (u64)i * VNET_BUF_SIZE; }
static u8 *tx_slot(struct vnet *n, u32 i) { return n->tx_mem + (u64)i * VNET_BUF_SIZE; }

static void rx_post(struct vnet *n, u8 *slot)
{
        struct vbuf v = { slot, VNET_HDR_LEN + VNET_MTU_FRAME };
        if (virtq_add(&n->rxq, &v, 0, 1, slot) >= 0)
                n->rx_refilled = 1;
}

int vnet_open(struct vnet *n, const struct virtio_mmio_info *info, const char *who)
{
        memset(n, 0, sizeof(*n));
        if (virtio_open(&n->dev, info, VIRTIO_NET_F_MAC, who))
                return -1;
        if (virtq_init(&n->dev, &n->rxq, 0, VNET_RX_BUFS) ||
            virtq_init(&n->dev, &n->txq, 1, VNET_TX_BUFS)) {
                printf("%s: cannot set up the virtio-net queues\n", who);
                return -1;
        }
        if (n->dev.features & VIRTIO_NET_F_MAC) {
                for (int i = 0; i < 6; i++)
                        n->mac[i] = virtio_config8(&n->dev, (u32)i);
        } else {
                u64 r = random_u64();
                memcpy(n->mac, &r, 6);
                n->mac[0] = (u8)((n->mac[0] & 0xfe) | 0x02);    /* unicast, local */
        }
        n->rx_mem = ram_alloc((u64)VNET_RX_BUFS * VNET_BUF_SIZE);
        n->tx_mem = ram_alloc((u64)VNET_TX_BUFS * VNET_BUF_SIZE);
        for (u32 i = 0; i < n->rxq.size; i++)
                rx_post(n, rx_slot(n, i));
        for (u32 i = 0; i < n->txq.size; i++)
                n->tx_free[n->tx_nfree++] = (u16)i;
        virtio_driver_ok(&n->dev);
        vnet_flush(n);
        return 0;
}

u8 *vnet_recv(struct vnet *n, u32 *len)
{
        u32 l;
        for (;;) {
                u8 *slot = virtq_get(&n->rxq, &l);
                if (!slot)
                        return 0;
                if (l > VNET_HDR_LEN && l <= VNET_HDR_LEN + VNET_MTU_FRAME) {
                        n->rx_frames++;
                        *len = l - VNET_HDR_LEN;
                        return slot + VNET_HDR_LEN;
                }
                rx_post(n, slot);       /* runt or oversized: recycle */
        }
}

void vnet_rx_done(struct vnet *n, u8 *frame)
{
        rx_post(n, frame - VNET_HDR_LEN);
}

u8 *vnet_tx_alloc(struct vnet *n)
{
        u8 *slot;
        while ((slot = virtq_get(&n->txq, 0)))
                n->tx_free[n->tx_nfree++] = (u16)((u64)(slot - n->tx_mem) / VNET_BUF_SIZE);
        if (!n->tx_nfree) {
                n->tx_drops++;
                return 0;
        }
        slot = tx_slot(n, n->tx_free[--n->tx_nfree]);
        memset(slot, 0, VNET_HDR_LEN);  /* no offloads: an all-zero header */
        return slot + VNET_HDR_LEN;
}

void vnet_tx_send(struct vnet *n, u8 *frame, u32 len)
{
        u8 *slot = frame - VNET_HDR_LEN;
        struct vbuf v = { slot, VNET_HDR_LEN + len };
        if (virtq_add(&n->txq, &v, 1, 0, slot) < 0) {
                /* Cannot happen: one descriptor per slot, as many as slots. */
                n->tx_free[n->tx_nfree++] = (u16)((u64)(slot - n->tx_mem) / VNET_BUF_SIZE);
                n->tx_drops++;
                return;
        }
        n->tx_frames++;
}

void vnet_flush(struct vnet *n)
{
        virtq_kick(&n->txq);
        if (n->rx_refilled) {
                n->rx_refilled = 0;
                virtq_kick(&n->rxq);
        }
}
