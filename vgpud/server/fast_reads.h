/*
 * What fast_reads.c and its Python side (vgpud/server/fast_reads.py) share. cffi reads this
 * file as its declarations too, so it holds plain C only: no preprocessor lines, sizes as
 * numbers (fast_reads.c checks them against its constants).
 */

/* One session's context: set by Python, read by the loop; the counts are for tests. */
struct vgpud_fast_reads {
    int sock;                 /* the client's socket */
    int loop_fd;              /* trio's epoll fd, or -1: never wait */
    const uint8_t *config;    /* the device's config bytes (ConfigView.data) */
    uint32_t config_size;
    uint32_t max_data;        /* the connection's max_data_xfer_size */
    uint32_t max_size;        /* the largest message it takes */
    uint32_t holes;           /* computed ranges [hole_start, hole_end): Python's */
    uint32_t hole_start[8];
    uint32_t hole_end[8];
    int why;                  /* why the last call returned (Outcome) */
    uint32_t unsent_len;      /* with FAST_UNSENT: the rest of a reply, to send */
    uint8_t unsent[4128];
    uint64_t waits;
    uint64_t woken_by_loop;
    uint64_t timed_out;
};

int vgpud_serve_config_reads(struct vgpud_fast_reads *ctx, int budget, int wait_ms);
