/*
 * Config-space REGION_READs served without Python (vgpud/server/fast_reads.py says when).
 *
 * A guest's config reads are one 32-byte REGION_READ each (spec vfio-user.md §3.9) and the
 * answer is bytes the device model keeps current in memory. This loop answers the ones it
 * can from that memory and stops, having consumed nothing, at the first message that is
 * anything else: the Python path then reads and answers it as it always did.
 *
 * While the socket is empty it may wait in poll() instead of returning to the event loop,
 * together with the loop's own epoll fd: anything else the loop waits for (another
 * device's socket, a signal, a thread's wake-up) makes that fd readable and ends the wait,
 * as does the loop's next timer (the caller's wait_ms).
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "fast_reads.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vfio-user is little-endian; this code copies its fields as they lie"
#endif

#define REGION_READ 9
#define CONFIG_REGION 7
#define FLAG_TYPE_REPLY 0x1
#define ACCESS_MESSAGE_SIZE 32 /* header (16) + offset, region, count (16) */
#define MAX_HOLES 8
#define CONFIG_MAX 4096
#define STRAY_FDS 16

enum {
    FAST_WOULD_BLOCK = 0, /* nothing to read (any wait is over): the loop's turn */
    FAST_NOT_OURS = 1,    /* something is there for the Python path; nothing consumed */
    FAST_BUDGET = 2,      /* served the most asked for in one call */
    FAST_UNSENT = 3,      /* the socket did not take a reply whole: the rest is in unsent */
    FAST_BROKEN = 4,      /* the socket gave back other than what it showed */
};

_Static_assert(sizeof(((struct vgpud_fast_reads *)0)->hole_start) == MAX_HOLES * 4, "holes");
_Static_assert(sizeof(((struct vgpud_fast_reads *)0)->unsent) == ACCESS_MESSAGE_SIZE + CONFIG_MAX,
               "a whole reply fits");

struct access_message {
    uint16_t msg_id;
    uint16_t command;
    uint32_t size;
    uint32_t flags;
    uint32_t error;
    uint64_t offset;
    uint32_t region;
    uint32_t count;
} __attribute__((packed));

_Static_assert(sizeof(struct access_message) == ACCESS_MESSAGE_SIZE, "wire layout");

/* Whether the Python path would answer this message with these config bytes: a plain
 * REGION_READ (no flags, no error, exactly the access head) of config space, inside it and
 * the negotiated limits, touching none of the bytes the device computes when read. Every
 * other message, the malformed ones included, is the Python path's to answer or refuse. */
static int ours(const struct vgpud_fast_reads *ctx, const struct access_message *m)
{
    if (m->command != REGION_READ || m->size != ACCESS_MESSAGE_SIZE || m->flags != 0 ||
        m->error != 0 || m->region != CONFIG_REGION || m->count == 0 ||
        m->count > ctx->max_data || ACCESS_MESSAGE_SIZE > ctx->max_size ||
        m->offset >= ctx->config_size || m->count > ctx->config_size - m->offset)
        return 0;
    uint64_t end = m->offset + m->count;
    for (uint32_t i = 0; i < ctx->holes; i++)
        if (m->offset < ctx->hole_end[i] && ctx->hole_start[i] < end)
            return 0;
    return 1;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for the socket until the loop has something or the deadline passes; 1 when the
 * socket alone became readable. */
static int wait_for_socket(struct vgpud_fast_reads *ctx, int64_t deadline)
{
    int64_t left = deadline - now_ms();
    if (ctx->loop_fd < 0 || left <= 0)
        return 0;
    struct pollfd fds[2] = {{ctx->sock, POLLIN, 0}, {ctx->loop_fd, POLLIN, 0}};
    ctx->waits++;
    int n = poll(fds, 2, left > 60000 ? 60000 : (int)left);
    if (n == 0) {
        ctx->timed_out++;
        return 0;
    }
    if (n < 0 || fds[1].revents) {
        ctx->woken_by_loop++;
        return 0; /* EINTR too: a signal's handler runs in the loop */
    }
    return 1; /* the socket: readable, hung up or failed, which the next peek tells */
}

/* Whether a call that has answered its budget may go on: only while nothing else in the
 * loop is ready and its next timer is not due (the wait's conditions), so that a budget
 * spent makes room for the rest of the loop rather than for nobody. */
static int loop_idle(const struct vgpud_fast_reads *ctx, int64_t deadline)
{
    if (ctx->loop_fd < 0 || deadline == 0 || now_ms() >= deadline)
        return 0;
    struct pollfd loop = {ctx->loop_fd, POLLIN, 0};
    return poll(&loop, 1, 0) == 0;
}

static void close_stray_fds(struct msghdr *msg)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int *fds = (int *)CMSG_DATA(c);
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++)
            close(fds[i]);
    }
}

int vgpud_serve_config_reads(struct vgpud_fast_reads *ctx, int budget, int wait_ms)
{
    int64_t deadline = wait_ms > 0 ? now_ms() + wait_ms : 0;
    int served = 0, in_round = 0;
    ctx->unsent_len = 0;
    for (;;) {
        if (in_round == budget) {
            if (!loop_idle(ctx, deadline))
                break;
            in_round = 0;
        }
        struct access_message m;
        struct iovec iov = {&m, sizeof m};
        struct msghdr peek = {.msg_iov = &iov, .msg_iovlen = 1};
        /* Peeked without room for fds: fds riding on these bytes show as MSG_CTRUNC and
         * stay queued for the Python path (the kernel closes only its peek's copies). */
        ssize_t got = recvmsg(ctx->sock, &peek, MSG_PEEK | MSG_DONTWAIT);
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wait_for_socket(ctx, deadline))
                continue;
            ctx->why = FAST_WOULD_BLOCK;
            return served;
        }
        if (got != sizeof m || peek.msg_flags & MSG_CTRUNC || !ours(ctx, &m)) {
            ctx->why = FAST_NOT_OURS; /* errors, EOF and split messages included */
            return served;
        }
        /* Consume exactly what was peeked, with room for fds should any come after all. */
        union {
            char buf[CMSG_SPACE(STRAY_FDS * sizeof(int))];
            struct cmsghdr align;
        } control;
        struct msghdr take = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                              .msg_controllen = sizeof control.buf};
        got = recvmsg(ctx->sock, &take, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (got != sizeof m || take.msg_controllen != 0 || take.msg_flags & MSG_CTRUNC) {
            if (got > 0)
                close_stray_fds(&take);
            ctx->why = FAST_BROKEN;
            return served;
        }
        served++;
        in_round++;
        /* The reply: the request's head echoed with the reply's size and type, then the
         * bytes (spec vfio-user.md §3.9; exactly count of them, R10). */
        uint8_t *reply = ctx->unsent;
        uint32_t size = ACCESS_MESSAGE_SIZE + m.count;
        m.size = size;
        m.flags = FLAG_TYPE_REPLY;
        memcpy(reply, &m, sizeof m);
        memcpy(reply + sizeof m, ctx->config + m.offset, m.count);
        ssize_t sent = send(ctx->sock, reply, size, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent != (ssize_t)size) {
            /* Full, or failed: the Python path sends the rest and meets any error itself. */
            uint32_t done = sent > 0 ? (uint32_t)sent : 0;
            memmove(reply, reply + done, size - done);
            ctx->unsent_len = size - done;
            ctx->why = FAST_UNSENT;
            return served;
        }
    }
    ctx->why = FAST_BUDGET;
    return served;
}
