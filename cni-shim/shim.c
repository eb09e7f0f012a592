/*
 * weave-ipam: the CNI IPAM plugin binary, a thin forwarder to the weaveipam daemon.
 *
 * The runtime (or a main plugin such as bridge) executes this with the CNI_* variables in
 * the environment and the network configuration on stdin.  All CNI logic lives in the
 * daemon: this program sends the variables (as percent-escaped headers) and stdin (as the
 * body) in one HTTP/1.1 request over the daemon's unix socket, prints the reply body on
 * stdout and exits with the status the daemon names in `X-CNI-Exit`.
 *
 * Answered here, without the daemon: VERSION (so a runtime can probe a node whose daemon
 * is not up yet), values that cannot be framed (code 4), and a daemon that cannot be
 * reached or answers badly (code 11, or 50 for STATUS): never a success, so a DEL is
 * retried rather than leaking the address.
 *
 * Environment beyond CNI's: WEAVE_IPAM_SOCKET (default /run/weave-ipam/ipam.sock),
 * WEAVE_IPAM_TIMEOUT (seconds for the whole exchange, 1..3600, default 60).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/weave-ipam/ipam.sock"
#define CURRENT_VERSION "1.1.0"
#define SUPPORTED_VERSIONS "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]"
#define MAX_STDIN (1024 * 1024)       /* network config, prevResult included */
#define MAX_VALUE 4096                /* one CNI_* value, after escaping */
#define MAX_REPLY (4 * 1024 * 1024)   /* headers and body */
#define MAX_HEADERS (64 * 1024)
#define CONNECT_TIMEOUT_MS 5000
#define DEFAULT_TIMEOUT_S 60          /* an ADD may wait for consensus or for space */
#define MAX_TIMEOUT_S 3600

/* CNI error codes the shim itself produces */
#define E_INVALID_ENV 4
#define E_DECODE 6
#define E_INVALID_CONFIG 7
#define E_TRY_AGAIN 11
#define E_NOT_AVAILABLE 50

struct buf {
    char *p;
    size_t len;
    size_t cap;
};

static char g_version[32] = CURRENT_VERSION; /* the caller's cniVersion, when readable */

/* ---- small helpers ------------------------------------------------------------------ */

static int buf_reserve(struct buf *b, size_t extra) {
    if (extra > SIZE_MAX - b->len) {
        return -1;
    }
    size_t need = b->len + extra;
    if (need <= b->cap) {
        return 0;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (p == NULL) {
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_add(struct buf *b, const char *data, size_t n) {
    if (buf_reserve(b, n) != 0) {
        return -1;
    }
    if (n > 0) {
        memcpy(b->p + b->len, data, n);
    }
    b->len += n;
    return 0;
}

static int buf_str(struct buf *b, const char *s) {
    return buf_add(b, s, strlen(s));
}

static int64_t now_ms(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        return 0;
    }
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int remaining_ms(int64_t deadline) {
    int64_t left = deadline - now_ms();
    if (left <= 0) {
        return 0;
    }
    return left > INT32_MAX ? INT32_MAX : (int)left;
}

/* Write all of it to fd, retrying on EINTR and partial writes (stdout may be a pipe). */
static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* JSON string contents for text we did not write ourselves (paths, strerror, replies). */
static int json_escape(struct buf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[7];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            if (buf_add(b, esc, 2) != 0) {
                return -1;
            }
        } else if (c < 0x20 || c == 0x7f || c >= 0x80) {
            /* controls, and bytes >= 0x80 (not validated as UTF-8): U+00XX keeps it JSON */
            esc[0] = '\\';
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            if (buf_add(b, esc, 6) != 0) {
                return -1;
            }
        } else if (buf_add(b, (const char *)&s[i], 1) != 0) {
            return -1;
        }
    }
    return 0;
}

/* Print a CNI error on stdout (libcni reads stdout) and exit non-zero. */
__attribute__((noreturn, format(printf, 3, 4)))
static void fail(int code, const char *details, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0) {
        msg[0] = '\0';
    }
    struct buf b = {0};
    char head[96];
    int hn = snprintf(head, sizeof head, "{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"",
                      g_version, code);
    int ok = hn > 0 && (size_t)hn < sizeof head && buf_add(&b, head, (size_t)hn) == 0 &&
             json_escape(&b, msg, strlen(msg)) == 0;
    if (ok && details != NULL && details[0] != '\0') {
        ok = buf_str(&b, "\",\"details\":\"") == 0 &&
             json_escape(&b, details, strlen(details)) == 0;
    }
    ok = ok && buf_str(&b, "\"}\n") == 0;
    if (ok) {
        (void)write_all(STDOUT_FILENO, b.p, b.len);
    } else {
        static const char oom[] = "{\"code\":11,\"msg\":\"weave-ipam: out of memory\"}\n";
        (void)write_all(STDOUT_FILENO, oom, sizeof oom - 1);
    }
    free(b.p);
    exit(1);
}

/* ---- stdin and its cniVersion --------------------------------------------------------- */

static void read_stdin(struct buf *in) {
    for (;;) {
        if (buf_reserve(in, 65536) != 0) {
            fail(E_INVALID_CONFIG, NULL, "weave-ipam: out of memory reading stdin");
        }
        ssize_t r = read(STDIN_FILENO, in->p + in->len, 65536);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EBADF) { /* no stdin at all: same as empty */
                return;
            }
            fail(E_DECODE, strerror(errno), "weave-ipam: cannot read the network "
                 "configuration from stdin");
        }
        if (r == 0) {
            return;
        }
        in->len += (size_t)r;
        if (in->len > MAX_STDIN) {
            fail(E_INVALID_CONFIG, NULL, "weave-ipam: the network configuration on stdin "
                 "is over %d bytes", MAX_STDIN);
        }
    }
}

static size_t skip_ws(const char *p, size_t n, size_t i) {
    while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r')) {
        i++;
    }
    return i;
}

/* i at an opening quote; returns the index after the closing quote, or n. */
static size_t skip_string(const char *p, size_t n, size_t i) {
    for (i++; i < n; i++) {
        if (p[i] == '\\') {
            i++;
        } else if (p[i] == '"') {
            return i + 1;
        }
    }
    return n;
}

/* Skip any JSON value without recursion; returns the index after it (n when malformed). */
static size_t skip_value(const char *p, size_t n, size_t i) {
    if (i >= n) {
        return n;
    }
    if (p[i] == '"') {
        return skip_string(p, n, i);
    }
    if (p[i] == '{' || p[i] == '[') {
        size_t depth = 0;
        while (i < n) {
            char c = p[i];
            if (c == '"') {
                i = skip_string(p, n, i);
                continue;
            }
            if (c == '{' || c == '[') {
                depth++;
            } else if (c == '}' || c == ']') {
                depth--;
                if (depth == 0) {
                    return i + 1;
                }
            }
            i++;
        }
        return n;
    }
    while (i < n && p[i] != ',' && p[i] != '}' && p[i] != ']' && p[i] != ' ' &&
           p[i] != '\t' && p[i] != '\n' && p[i] != '\r') {
        i++;
    }
    return i;
}

/* The top-level "cniVersion" string, kept only if it looks like a version (it is echoed
 * into JSON we print); otherwise CURRENT_VERSION stays. */
static void find_version(const char *p, size_t n) {
    static const char key[] = "\"cniVersion\"";
    size_t i = skip_ws(p, n, 0);
    if (i >= n || p[i] != '{') {
        return;
    }
    i++;
    for (;;) {
        i = skip_ws(p, n, i);
        if (i >= n || p[i] != '"') {
            return;
        }
        size_t kstart = i;
        i = skip_string(p, n, i);
        int match = i - kstart == sizeof key - 1 && memcmp(p + kstart, key, sizeof key - 1) == 0;
        i = skip_ws(p, n, i);
        if (i >= n || p[i] != ':') {
            return;
        }
        i = skip_ws(p, n, i + 1);
        if (match) {
            if (i >= n || p[i] != '"') {
                return;
            }
            size_t vstart = i + 1, vend = vstart;
            while (vend < n && vend - vstart < sizeof g_version - 1 &&
                   ((p[vend] >= '0' && p[vend] <= '9') || p[vend] == '.' ||
                    (p[vend] >= 'a' && p[vend] <= 'z') || p[vend] == '-' || p[vend] == '+')) {
                vend++;
            }
            if (vend < n && p[vend] == '"' && vend > vstart) {
                memcpy(g_version, p + vstart, vend - vstart);
                g_version[vend - vstart] = '\0';
            }
            return;
        }
        i = skip_ws(p, n, skip_value(p, n, i));
        if (i >= n || p[i] != ',') {
            return;
        }
        i++;
    }
}

/* ---- the request ---------------------------------------------------------------------- */

/* One CNI_* variable as a header: unset variables are left out (the daemon tells unset
 * from empty); '%', space and non-ASCII bytes are percent-escaped; control characters
 * (CR, LF above all) are refused, never framed. */
static void add_header(struct buf *req, const char *env, const char *header) {
    static const char hex[] = "0123456789ABCDEF";
    const char *v = getenv(env);
    if (v == NULL) {
        return;
    }
    char enc[MAX_VALUE + 4];
    size_t n = 0;
    for (const unsigned char *s = (const unsigned char *)v; *s != '\0'; s++) {
        if (*s < 0x20 || *s == 0x7f) {
            fail(E_INVALID_ENV, NULL, "weave-ipam: %s contains a control character "
                 "(0x%02x at byte %zu); refusing it", env, *s,
                 (size_t)(s - (const unsigned char *)v));
        }
        int escape = *s == '%' || *s == ' ' || *s >= 0x80;
        if (n + (escape ? 3 : 1) > MAX_VALUE) {
            fail(E_INVALID_ENV, NULL, "weave-ipam: %s is too long (over %d bytes once "
                 "escaped)", env, MAX_VALUE);
        }
        if (escape) {
            enc[n++] = '%';
            enc[n++] = hex[*s >> 4];
            enc[n++] = hex[*s & 15];
        } else {
            enc[n++] = (char)*s;
        }
    }
    if (buf_str(req, header) != 0 || buf_str(req, ": ") != 0 || buf_add(req, enc, n) != 0 ||
        buf_str(req, "\r\n") != 0) {
        fail(E_TRY_AGAIN, NULL, "weave-ipam: out of memory");
    }
}

static void build_request(struct buf *req, const struct buf *body) {
    char len[64];
    int n = snprintf(len, sizeof len, "Content-Length: %zu\r\n", body->len);
    if (n < 0 || (size_t)n >= sizeof len) {
        fail(E_TRY_AGAIN, NULL, "weave-ipam: internal error formatting the request");
    }
    if (buf_str(req, "POST /cni HTTP/1.1\r\nHost: weave-ipam\r\n"
                "User-Agent: weave-ipam-shim/1\r\nConnection: close\r\n"
                "Content-Type: application/json\r\n") != 0 ||
        buf_add(req, len, (size_t)n) != 0) {
        fail(E_TRY_AGAIN, NULL, "weave-ipam: out of memory");
    }
    add_header(req, "CNI_COMMAND", "X-CNI-Command");
    add_header(req, "CNI_CONTAINERID", "X-CNI-Containerid");
    add_header(req, "CNI_NETNS", "X-CNI-Netns");
    add_header(req, "CNI_IFNAME", "X-CNI-Ifname");
    add_header(req, "CNI_ARGS", "X-CNI-Args");
    add_header(req, "CNI_PATH", "X-CNI-Path");
    if (buf_str(req, "\r\n") != 0 || buf_add(req, body->p, body->len) != 0) {
        fail(E_TRY_AGAIN, NULL, "weave-ipam: out of memory");
    }
}

/* ---- talking to the daemon ------------------------------------------------------------ */

static const char *g_sock;
static int g_unreachable_code = E_TRY_AGAIN;
static int g_send_errno; /* why sending failed, if it did, for the message */

__attribute__((noreturn, format(printf, 1, 2)))
static void unreachable(const char *fmt, ...) {
    char cause[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(cause, sizeof cause, fmt, ap);
    va_end(ap);
    if (n < 0) {
        cause[0] = '\0';
    }
    if (g_send_errno != 0) {
        size_t used = strlen(cause);
        (void)snprintf(cause + used, sizeof cause - used, " (after sending the request "
                       "failed: %s)", strerror(g_send_errno));
    }
    fail(g_unreachable_code, cause, "weave-ipam: the weaveipam daemon at %s could not "
         "be reached or did not answer; try again later (is the daemon running? set "
         "WEAVE_IPAM_SOCKET if it listens elsewhere)", g_sock);
}

static int connect_daemon(int64_t deadline) {
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t plen = strlen(g_sock);
    if (plen == 0 || plen >= sizeof sa.sun_path) {
        fail(E_INVALID_ENV, NULL, "weave-ipam: socket path %s is empty or longer than %zu "
             "bytes", g_sock, sizeof sa.sun_path - 1);
    }
    memcpy(sa.sun_path, g_sock, plen);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        unreachable("socket: %s", strerror(errno));
    }
    int64_t cdl = now_ms() + CONNECT_TIMEOUT_MS;
    if (cdl > deadline) {
        cdl = deadline;
    }
    for (;;) {
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            return fd;
        }
        int e = errno;
        if (e == EINTR) {
            continue;
        }
        if (e == EISCONN) { /* completed while a poll below was interrupted */
            return fd;
        }
        if (e == EAGAIN) {
            /* unix sockets: the listen backlog is full; retry shortly, bounded */
            if (remaining_ms(cdl) == 0) {
                unreachable("connect: the daemon's listen queue stayed full for %d ms",
                            CONNECT_TIMEOUT_MS);
            }
            struct timespec ts = {0, 10 * 1000 * 1000};
            (void)nanosleep(&ts, NULL);
            continue;
        }
        if (e == EINPROGRESS || e == EALREADY) {
            struct pollfd pf = {fd, POLLOUT, 0};
            int pr = poll(&pf, 1, remaining_ms(cdl));
            if (pr < 0 && errno == EINTR) {
                continue;
            }
            if (pr < 0) {
                unreachable("poll: %s", strerror(errno));
            }
            if (pr == 0) {
                unreachable("connect: timed out after %d ms", CONNECT_TIMEOUT_MS);
            }
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0) {
                unreachable("getsockopt: %s", strerror(errno));
            }
            if (soerr != 0) {
                unreachable("connect: %s", strerror(soerr));
            }
            return fd;
        }
        unreachable("connect: %s", strerror(e));
    }
}

/* Send everything; 0 on success, else the errno (the daemon may have answered early). */
static int send_all(int fd, const char *p, size_t n, int64_t deadline) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w >= 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            return errno;
        }
        struct pollfd pf = {fd, POLLOUT, 0};
        int pr = poll(&pf, 1, remaining_ms(deadline));
        if (pr < 0 && errno == EINTR) {
            continue;
        }
        if (pr < 0) {
            return errno;
        }
        if (pr == 0) {
            return ETIMEDOUT;
        }
    }
    return 0;
}

struct reply {
    int status;        /* HTTP status */
    int exit_code;     /* X-CNI-Exit, or -1 when absent */
    const char *body;
    size_t body_len;
};

static int ieq_prefix(const char *line, size_t n, const char *name) {
    size_t k = strlen(name);
    if (n < k + 1 || line[k] != ':') {
        return 0;
    }
    for (size_t i = 0; i < k; i++) {
        char a = line[i], b = name[i];
        if (a >= 'A' && a <= 'Z') {
            a = (char)(a - 'A' + 'a');
        }
        if (b >= 'A' && b <= 'Z') {
            b = (char)(b - 'A' + 'a');
        }
        if (a != b) {
            return 0;
        }
    }
    return 1;
}

/* A non-negative decimal header value (whitespace around allowed); -1 if not one. */
static long long header_number(const char *v, size_t n, long long max) {
    size_t i = 0;
    while (i < n && (v[i] == ' ' || v[i] == '\t')) {
        i++;
    }
    while (n > i && (v[n - 1] == ' ' || v[n - 1] == '\t')) {
        n--;
    }
    if (i == n) {
        return -1;
    }
    long long x = 0;
    for (; i < n; i++) {
        if (v[i] < '0' || v[i] > '9') {
            return -1;
        }
        x = x * 10 + (v[i] - '0');
        if (x > max) {
            return -1;
        }
    }
    return x;
}

/* Parse what we have so far.  1: complete; 0: need more; -1: malformed (why in *err). */
static int parse_reply(const char *p, size_t n, int eof, struct reply *r, const char **err) {
    const char *end = NULL;
    for (size_t i = 0; i + 3 < n; i++) {
        if (p[i] == '\r' && p[i + 1] == '\n' && p[i + 2] == '\r' && p[i + 3] == '\n') {
            end = p + i;
            break;
        }
    }
    if (end == NULL) {
        if (n > MAX_HEADERS) {
            *err = "the reply's headers are too long";
            return -1;
        }
        if (eof) {
            *err = n == 0 ? "the daemon closed the connection without answering"
                          : "the reply ended inside its headers";
            return -1;
        }
        return 0;
    }
    if (n < 12 || memcmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ' || p[9] < '1' || p[9] > '5' ||
        p[10] < '0' || p[10] > '9' || p[11] < '0' || p[11] > '9') {
        *err = "the reply is not HTTP/1.x";
        return -1;
    }
    r->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    r->exit_code = -1;
    long long clen = -1;
    const char *line = memchr(p, '\n', (size_t)(end - p));
    while (line != NULL && line < end) {
        line++;
        const char *nl = memchr(line, '\r', (size_t)(end + 2 - line));
        if (nl == NULL) {
            break;
        }
        size_t ln = (size_t)(nl - line);
        if (ieq_prefix(line, ln, "x-cni-exit")) {
            long long x = header_number(line + 11, ln - 11, 255);
            if (x < 0) {
                *err = "the reply's X-CNI-Exit is not a number from 0 to 255";
                return -1;
            }
            r->exit_code = (int)x;
        } else if (ieq_prefix(line, ln, "content-length")) {
            clen = header_number(line + 15, ln - 15, MAX_REPLY);
            if (clen < 0) {
                *err = "the reply's Content-Length is bad or too large";
                return -1;
            }
        } else if (ieq_prefix(line, ln, "transfer-encoding")) {
            *err = "the reply uses a transfer encoding (expected Content-Length)";
            return -1;
        }
        line = nl + 1; /* at '\n' */
        if (line >= end) {
            break;
        }
    }
    const char *body = end + 4;
    size_t have = n - (size_t)(body - p);
    if (clen >= 0) {
        if (have < (size_t)clen) {
            if (eof) {
                *err = "the reply is shorter than its Content-Length";
                return -1;
            }
            return 0;
        }
        have = (size_t)clen;
    } else if (!eof) {
        return 0; /* Connection: close without a length: the body runs to EOF */
    }
    r->body = body;
    r->body_len = have;
    return 1;
}

static void read_reply(int fd, struct buf *in, int64_t deadline, int timeout_s,
                       struct reply *r) {
    const char *err = NULL;
    for (;;) {
        if (in->len > MAX_REPLY) {
            unreachable("the reply is over %d bytes", MAX_REPLY);
        }
        if (buf_reserve(in, 65536) != 0) {
            unreachable("out of memory reading the reply");
        }
        ssize_t got = recv(fd, in->p + in->len, 65536, 0);
        if (got < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd pf = {fd, POLLIN, 0};
                int left = remaining_ms(deadline);
                if (left == 0) {
                    unreachable("no complete reply within %d s", timeout_s);
                }
                int pr = poll(&pf, 1, left);
                if (pr < 0 && errno != EINTR) {
                    unreachable("poll: %s", strerror(errno));
                }
                if (pr == 0) {
                    unreachable("no complete reply within %d s", timeout_s);
                }
                continue;
            }
            if (errno == ECONNRESET) {
                got = 0; /* treat as EOF: a complete reply may already be buffered */
            } else {
                unreachable("reading the reply: %s", strerror(errno));
            }
        }
        in->len += (size_t)got;
        int st = parse_reply(in->p, in->len, got == 0, r, &err);
        if (st == 1) {
            return;
        }
        if (st < 0) {
            unreachable("%s", err);
        }
    }
}

static int parse_timeout(void) {
    const char *t = getenv("WEAVE_IPAM_TIMEOUT");
    if (t == NULL || t[0] == '\0') {
        return DEFAULT_TIMEOUT_S;
    }
    long long x = header_number(t, strlen(t), MAX_TIMEOUT_S);
    if (x < 1) {
        fail(E_INVALID_ENV, NULL, "weave-ipam: WEAVE_IPAM_TIMEOUT must be a whole number of "
             "seconds from 1 to %d", MAX_TIMEOUT_S);
    }
    return (int)x;
}

int main(void) {
    if (signal(SIGPIPE, SIG_IGN) == SIG_ERR) {
        fail(E_TRY_AGAIN, strerror(errno), "weave-ipam: cannot ignore SIGPIPE");
    }
    struct buf in = {0};
    read_stdin(&in);
    find_version(in.p ? in.p : "", in.len);

    const char *cmd = getenv("CNI_COMMAND");
    if (cmd != NULL && strcmp(cmd, "VERSION") == 0) {
        free(in.p);
        char out[256];
        int n = snprintf(out, sizeof out, "{\"cniVersion\":\"%s\",\"supportedVersions\":%s}\n",
                         g_version, SUPPORTED_VERSIONS);
        if (n < 0 || (size_t)n >= sizeof out || write_all(STDOUT_FILENO, out, (size_t)n) != 0) {
            return 1;
        }
        return 0;
    }
    if (cmd != NULL && strcmp(cmd, "STATUS") == 0) {
        g_unreachable_code = E_NOT_AVAILABLE; /* the spec's answer for "cannot serve ADD" */
    }
    const char *s = getenv("WEAVE_IPAM_SOCKET");
    g_sock = (s != NULL && s[0] != '\0') ? s : DEFAULT_SOCKET;
    int timeout_s = parse_timeout();
    int64_t deadline = now_ms() + (int64_t)timeout_s * 1000;

    struct buf req = {0};
    build_request(&req, &in); /* refuses unframeable values before any connection */
    free(in.p);

    int fd = connect_daemon(deadline);
    int serr = send_all(fd, req.p, req.len, deadline);
    free(req.p);
    struct buf rep = {0};
    struct reply r = {0, -1, NULL, 0};
    if (serr == ETIMEDOUT) {
        unreachable("sending the request: no progress within %d s", timeout_s);
    }
    g_send_errno = serr;
    /* on EPIPE/ECONNRESET the daemon may have answered early (say, the body is too big) */
    read_reply(fd, &rep, deadline, timeout_s, &r);
    (void)close(fd); /* the reply is complete: a failed close changes nothing */
    if (r.exit_code < 0) {
        char details[600];
        struct buf d = {0};
        size_t cut = r.body_len > 400 ? 400 : r.body_len;
        int n = snprintf(details, sizeof details, "HTTP %d: ", r.status);
        if (n < 0 || (size_t)n >= sizeof details) {
            n = 0;
        }
        if (buf_add(&d, details, (size_t)n) != 0 || buf_add(&d, r.body, cut) != 0 ||
            buf_add(&d, "", 1) != 0) {
            unreachable("out of memory");
        }
        /* not a CNI answer: an older daemon without /cni, or the request was refused */
        if (r.status == 413) {
            fail(E_INVALID_CONFIG, d.p, "weave-ipam: the daemon refused the request as too "
                 "large");
        }
        unreachable("the daemon's reply is not a CNI answer (%s)", d.p);
    }
    int status = r.exit_code;
    if (r.body_len > 0 && write_all(STDOUT_FILENO, r.body, r.body_len) != 0) {
        status = status != 0 ? status : 1; /* the runtime cannot read a success */
    }
    free(rep.p);
    return status;
}
