/* vsock-tool: both ends of a vsock line exchange, for the lane tests. Lines end in '\n'.
 *   vsock-tool listen PORT               (guest) accept one vsock connection, answer its line
 *                                        with "echo:LINE"
 *   vsock-tool connect CID PORT MSG      (guest) send MSG to CID:PORT, print the answer line
 *   vsock-tool unix-echo PATH            (host) the same as listen, on a Unix socket at PATH
 *   vsock-tool unix-connect PATH PORT MSG  (host) reach guest PORT through bulkhead's socket
 *                                        PATH (CONNECT PORT, then OK), send MSG, print the
 *                                        answer line
 * Exits 0 when the exchange completed, 1 otherwise. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int read_line(int fd, char *buf, size_t size) {
    size_t n = 0;
    while (n + 1 < size) {
        char c;
        if (read(fd, &c, 1) != 1) return -1;
        if (c == '\n') break;
        buf[n++] = c;
    }
    buf[n] = 0;
    return (int)n;
}

static int write_all(int fd, const char *s) {
    size_t len = strlen(s);
    while (len) {
        ssize_t n = write(fd, s, len);
        if (n <= 0) return -1;
        s += n;
        len -= (size_t)n;
    }
    return 0;
}

static int answer(int listener) {
    int c = accept(listener, 0, 0);
    if (c < 0) { perror("vsock-tool: accept"); return 1; }
    char line[256], reply[300];
    if (read_line(c, line, sizeof line) < 0) { fprintf(stderr, "vsock-tool: no line\n"); return 1; }
    snprintf(reply, sizeof reply, "echo:%s\n", line);
    if (write_all(c, reply) < 0) return 1;
    printf("vsock-tool: answered %s\n", line);
    close(c);
    return 0;
}

static int exchange(int fd, const char *msg) {
    char line[300];
    if (write_all(fd, msg) < 0 || write_all(fd, "\n") < 0) return 1;
    if (read_line(fd, line, sizeof line) < 0) { fprintf(stderr, "vsock-tool: no answer\n"); return 1; }
    printf("vsock-tool: got %s\n", line);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "listen") == 0) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                                .svm_port = (unsigned)atoi(argv[2])};
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) {
            perror("vsock-tool: listen");
            return 1;
        }
        return answer(s);
    }
    if (argc == 5 && strcmp(argv[1], "connect") == 0) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = (unsigned)atoi(argv[2]),
                                .svm_port = (unsigned)atoi(argv[3])};
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) {
            perror("vsock-tool: connect");
            return 1;
        }
        return exchange(s, argv[4]);
    }
    struct sockaddr_un u = {.sun_family = AF_UNIX};
    if (argc >= 3) strncpy(u.sun_path, argv[2], sizeof u.sun_path - 1);
    if (argc == 3 && strcmp(argv[1], "unix-echo") == 0) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0 || bind(s, (struct sockaddr *)&u, sizeof u) || listen(s, 1)) {
            perror("vsock-tool: unix listen");
            return 1;
        }
        return answer(s);
    }
    if (argc == 5 && strcmp(argv[1], "unix-connect") == 0) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        char line[64], request[64];
        if (s < 0 || connect(s, (struct sockaddr *)&u, sizeof u)) {
            perror("vsock-tool: unix connect");
            return 1;
        }
        snprintf(request, sizeof request, "CONNECT %s\n", argv[3]);
        if (write_all(s, request) < 0 || read_line(s, line, sizeof line) < 0 ||
            strncmp(line, "OK ", 3) != 0) {
            fprintf(stderr, "vsock-tool: bulkhead did not connect us\n");
            return 1;
        }
        return exchange(s, argv[4]);
    }
    fprintf(stderr, "usage: see the comment at the top of vsock-tool.c\n");
    return 2;
}
