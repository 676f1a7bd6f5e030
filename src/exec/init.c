/*
 * bulkhead exec's guest init: PID 1 of the VM, from an initramfs `bulkhead exec` makes on the
 * fly with this program and /exec.spec.
 *
 * It connects three vsock streams to the host (CID 2): the command's stdout, its stderr, and
 * a status stream. The host listens before the VM starts and the guest connects, so there is
 * no agent to wait for. Then it mounts the host's root (virtio-fs tag "root", read-only),
 * puts tmpfs on /tmp and /run and a writable overlay on /var, mounts the extra shares, enters
 * the root, runs the command in the caller's directory as the caller's uid and gids with the
 * caller's environment, and reports how it ended on the status stream: "exit N", "signal N",
 * or "error TEXT" when it never ran. It shuts its end of stdout and stderr first, so the host
 * has every byte before it reads the status, and powers off once the host has closed the
 * status stream.
 *
 * /exec.spec is a list of NUL-terminated strings:
 *   version ("1"), cwd, uid, gid, ngroups, groups..., nshares, (tag, path, "ro"|"rw")...,
 *   nenv, env..., argc, argv...
 * With /modules/order in the initramfs (a stock kernel), the modules it lists are loaded
 * first, in order.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define HOST_CID 2
#define PORT_STDOUT 10240
#define PORT_STDERR 10241
#define PORT_STATUS 10242
#define MAX_FIELDS 65536

static int status_fd = -1, out_fd = -1, err_fd = -1;

/* Says why the command never ran (to the host when the status stream is up, and to the
 * console), then powers off. */
static void fail(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "bulkhead-init: %s\n", msg);
    if (status_fd >= 0) {
        /* The same order as a command's end: the output streams end, then the status, and the
         * host's close says it has it (bounded: a host that went away must not keep us). */
        if (out_fd >= 0)
            shutdown(out_fd, SHUT_WR);
        if (err_fd >= 0)
            shutdown(err_fd, SHUT_WR);
        dprintf(status_fd, "error %s\n", msg);
        struct pollfd p = {.fd = status_fd, .events = POLLIN};
        char ack;
        while (poll(&p, 1, 2000) == 1 && read(status_fd, &ack, 1) > 0)
            ;
    }
    sync();
    reboot(RB_POWER_OFF);
    _exit(1);
}

static int vsock_connect(unsigned port)
{
    struct sockaddr_vm addr = {
        .svm_family = AF_VSOCK,
        .svm_cid = HOST_CID,
        .svm_port = port,
    };
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail("vsock socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0)
        fail("vsock connect to host port %u: %s", port, strerror(errno));
    return fd;
}

/* The spec's fields, in order. */
static char **fields;
static size_t nfields, next_field;

static void read_spec(void)
{
    int fd = open("/exec.spec", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("/exec.spec: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0)
        fail("/exec.spec: empty");
    char *buf = malloc((size_t)st.st_size + 1);
    if (!buf)
        fail("/exec.spec: out of memory");
    size_t have = 0;
    while (have < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + have, (size_t)st.st_size - have);
        if (n <= 0)
            fail("/exec.spec: short read");
        have += (size_t)n;
    }
    close(fd);
    buf[have] = '\0';
    fields = calloc(MAX_FIELDS, sizeof *fields);
    if (!fields)
        fail("/exec.spec: out of memory");
    for (size_t at = 0; at < have && nfields < MAX_FIELDS;) {
        fields[nfields++] = buf + at;
        at += strlen(buf + at) + 1;
    }
}

static const char *field(void)
{
    if (next_field >= nfields)
        fail("/exec.spec: truncated");
    return fields[next_field++];
}

static unsigned long number(void)
{
    const char *text = field();
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno || *text == '\0' || *end != '\0')
        fail("/exec.spec: %s is not a number", text);
    return value;
}

static void mount_or_fail(const char *src, const char *dst, const char *type,
                          unsigned long flags, const char *data)
{
    if (mount(src, dst, type, flags, data) != 0)
        fail("mount %s on %s (%s): %s", src, dst, type, strerror(errno));
}

/* With /modules/order (a stock kernel whose drivers are modules): loads each listed module. */
static void load_modules(void)
{
    FILE *order = fopen("/modules/order", "re");
    if (!order)
        return;
    char line[256];
    while (fgets(line, sizeof line, order)) {
        line[strcspn(line, "\n")] = '\0';
        if (!line[0])
            continue;
        char path[320];
        snprintf(path, sizeof path, "/modules/%s", line);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            fail("module %s: %s", path, strerror(errno));
        /* A compressed module is the kernel's to decompress (MODULE_INIT_COMPRESSED_FILE). */
        size_t len = strlen(line);
        int compressed = (len > 3 && strcmp(line + len - 3, ".xz") == 0) ||
                         (len > 4 && strcmp(line + len - 4, ".zst") == 0) ||
                         (len > 3 && strcmp(line + len - 3, ".gz") == 0);
        if (syscall(SYS_finit_module, fd, "", compressed ? 4 : 0) != 0 && errno != EEXIST)
            fail("loading module %s: %s", path, strerror(errno));
        close(fd);
    }
    fclose(order);
}

/* Makes `path` and its parents (inside a tmpfs the init mounted; elsewhere they exist). */
static void mkdir_parents(char *path)
{
    for (char *slash = strchr(path + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        mkdir(path, 0755);
        *slash = '/';
    }
    mkdir(path, 0755);
}

/* A writable overlay on the read-only root's `dir`, its changes in a tmpfs; a plain tmpfs
 * when the kernel has no overlayfs. */
static void writable(const char *dir, const char *name)
{
    char upper[64], work[64], opts[256];
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return;
    snprintf(upper, sizeof upper, "/overlay/%s", name);
    snprintf(work, sizeof work, "/overlay/%s.work", name);
    if (mkdir(upper, 0755) == 0 && mkdir(work, 0755) == 0) {
        snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", dir, upper, work);
        if (mount("overlay", dir, "overlay", 0, opts) == 0)
            return;
    }
    mount_or_fail("tmpfs", dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
}

int main(void)
{
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    load_modules();

    int out = out_fd = vsock_connect(PORT_STDOUT);
    int err = err_fd = vsock_connect(PORT_STDERR);
    status_fd = vsock_connect(PORT_STATUS);

    read_spec();
    if (strcmp(field(), "1") != 0)
        fail("/exec.spec: unknown version");
    const char *cwd = field();
    uid_t uid = (uid_t)number();
    gid_t gid = (gid_t)number();
    size_t ngroups = number();
    gid_t *groups = calloc(ngroups + 1, sizeof *groups);
    if (!groups)
        fail("out of memory");
    for (size_t i = 0; i < ngroups; i++)
        groups[i] = (gid_t)number();

    mount_or_fail("root", "/newroot", "virtiofs", MS_RDONLY, NULL);
    mount_or_fail("tmpfs", "/overlay", "tmpfs", 0, "mode=0755");
    mount_or_fail("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_fail("sysfs", "/newroot/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_fail("devtmpfs", "/newroot/dev", "devtmpfs", MS_NOSUID, NULL);
    mkdir("/newroot/dev/pts", 0755);
    mount("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666");
    mkdir("/newroot/dev/shm", 01777);
    mount("tmpfs", "/newroot/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_or_fail("tmpfs", "/newroot/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_or_fail("tmpfs", "/newroot/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    writable("/newroot/var", "var");

    size_t nshares = number();
    for (size_t i = 0; i < nshares; i++) {
        const char *tag = field();
        const char *path = field();
        int rw = strcmp(field(), "rw") == 0;
        char at[4096];
        snprintf(at, sizeof at, "/newroot%s", path);
        /* A share under /tmp, /run or /var needs its mount point made in the tmpfs there. */
        mkdir_parents(at);
        mount_or_fail(tag, at, "virtiofs", rw ? 0 : MS_RDONLY, NULL);
    }

    size_t nenv = number();
    char **env = calloc(nenv + 1, sizeof *env);
    if (!env)
        fail("out of memory");
    for (size_t i = 0; i < nenv; i++)
        env[i] = (char *)field();
    size_t argc = number();
    if (argc == 0)
        fail("no command");
    char **argv = calloc(argc + 1, sizeof *argv);
    if (!argv)
        fail("out of memory");
    for (size_t i = 0; i < argc; i++)
        argv[i] = (char *)field();

    if (chroot("/newroot") != 0 || chdir("/") != 0)
        fail("entering the shared root: %s", strerror(errno));
    if (chdir(cwd) != 0)
        fail("cd %s: %s", cwd, strerror(errno));

    pid_t child = fork();
    if (child < 0)
        fail("fork: %s", strerror(errno));
    if (child == 0) {
        int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (null < 0 || dup2(null, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
            _exit(127);
        if (setgroups(ngroups, groups) != 0 || setgid(gid) != 0 || setuid(uid) != 0) {
            dprintf(2, "bulkhead-init: cannot become uid %u gid %u: %s\n", uid, gid,
                    strerror(errno));
            _exit(126);
        }
        /* PATH from the caller's environment, as a shell would search it. */
        environ = env;
        execvp(argv[0], argv);
        int e = errno;
        dprintf(2, "bulkhead exec: %s: %s\n", argv[0], strerror(e));
        _exit(e == ENOENT ? 127 : 126);
    }

    /* PID 1 reaps every orphan until the command itself ends. */
    int wstatus = 0;
    for (;;) {
        pid_t done = wait(&wstatus);
        if (done == child)
            break;
        if (done < 0 && errno != EINTR)
            fail("wait: %s", strerror(errno));
    }
    /* The end of both streams, queued after the command's last bytes; a background process
     * that still holds them writes to nobody from here. */
    shutdown(out, SHUT_WR);
    shutdown(err, SHUT_WR);
    if (WIFEXITED(wstatus))
        dprintf(status_fd, "exit %d\n", WEXITSTATUS(wstatus));
    else
        dprintf(status_fd, "signal %d\n", WTERMSIG(wstatus));
    /* The host closes the status stream once it has everything. */
    char ack;
    while (read(status_fd, &ack, 1) > 0)
        ;
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
