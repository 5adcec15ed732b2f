// The hive's worker trampoline: a few hundred bytes of x86-64 code, no libc, single-threaded.
// The hive starts it in the worker's cgroup and session; it makes the worker's log file its
// stdout and stderr, writes its own PID into the LISTEN_PID slot of its environment and execs the
// worker in place, so the worker keeps this PID and start time and LISTEN_PID names it.
//
//   argv[0] any name, argv[1] log file ("" for none), argv[2] worker binary, argv[3..] worker argv
//   envp    the worker's environment; an entry "LISTEN_PID=" followed by at least 10 bytes is
//           rewritten to "LISTEN_PID=<pid>"
//
// As the zygote (argv[1] "-zygote"), started once by the hive, it serves Spawns on the socket that
// is its fd 3, so that a Spawn waits neither for the hive's fork to be scheduled nor for the move of
// a process into a cgroup (a write to cgroup.procs takes a lock that waits for an RCU grace
// period, ~11 ms here, when no other move happened in the last few milliseconds). Each
// SOCK_SEQPACKET request holds u32 argc, u32 envc, u32 flags (1: a cgroup, 2: a socket), then
// NUL-terminated strings: log file, worker binary, argc arguments, envc environment entries; with
// SCM_RIGHTS, the pipe that is the worker's stderr until it has the log, the worker cgroup's
// directory if flag 1, and the socket the worker gets as fd 3 if flag 2. The zygote clones a child
// straight into that cgroup (CLONE_INTO_CGROUP) as the hive's child (CLONE_PARENT: the hive reaps
// it and it keeps the PID the hive is told), answers with its PID as one 8-byte message (a
// negative errno when the clone or the request failed), and waits for the next. The child starts
// its own session and does what the trampoline does. End of file (the hive closed its end or died)
// ends the zygote with exit code 0.
//
// The clone shares the zygote's memory (CLONE_VM) instead of copying it: a fork copies the page
// tables, 58-76 us on a 2-core VM against 18-28 us for this. Without CLONE_VFORK the zygote answers
// at once, while the child still runs on, and reads from, memory of the zygote's: a region (a stack,
// the request, its argv and envp) that is the child's alone until the child has left that memory.
// The kernel says when: with CLONE_CHILD_CLEARTID it writes 0 to the region's word once the child's
// execve no longer needs the old memory (exec_mm_release) or the child exits, whichever comes first.
// The zygote sets the word before the clone, takes a region only while its word is 0, and maps
// another region (up to MAXREGIONS) when none is free. Past that (children stopped before their
// exec) it copies its memory as before (a fork, in its static region), which never has to wait.
// The child has its own descriptors and signal dispositions (no CLONE_FILES, no CLONE_SIGHAND; the
// zygote has no handlers) and touches nothing but its region until it execs or exits. As with
// vfork (Go's and glibc's process starts use it too), the kernel's OOM killer, killing a child that
// still shares the zygote's memory, kills the zygote too; the hive then starts another.
//
// Exit codes (the hive reports them through OnExit, with the log's last lines):
//   0 when started with no arguments (the hive's start-up probe), 2 for a malformed call,
//   126 when the log file cannot be opened or locked (the reason goes to stderr, a pipe the hive
//   reads), 127 when the exec fails (the reason is in the log).
//
// Rebuild with `make trampoline` (needs gcc for x86-64); the bytes are committed in
// ../trampoline_linux_amd64.go so that building rbee needs only Go.

typedef unsigned long u64;

#define SYS_write 1
#define SYS_mmap 9
#define SYS_mprotect 10
#define SYS_open 2
#define SYS_close 3
#define SYS_poll 7
#define SYS_getpid 39
#define SYS_execve 59
#define SYS_exit 60
#define SYS_dup3 292
#define SYS_flock 73
#define SYS_mkdir 83
#define SYS_recvmsg 47
#define SYS_fcntl 72
#define SYS_setsid 112
#define SYS_clone3 435
#define CLONE_VM 0x100
#define CLONE_PARENT 0x8000
#define CLONE_CHILD_CLEARTID 0x200000
#define CLONE_INTO_CGROUP 0x200000000UL
#define MSG_CMSG_CLOEXEC 0x40000000
#define EINTR 4
#define EINVAL 22
#define F_DUPFD_CLOEXEC 1030
#define MSG_TRUNC 0x20
#define MSG_CTRUNC 0x08
#define SOL_SOCKET 1
#define SCM_RIGHTS 1
#define PROT_READ 1
#define PROT_WRITE 2
#define MAP_PRIVATE 2
#define MAP_ANONYMOUS 0x20

struct iovec {
	void *base;
	u64 len;
};
struct msghdr {
	void *name;
	unsigned int namelen;
	struct iovec *iov;
	u64 iovlen;
	void *control;
	u64 controllen;
	int flags;
};
struct cmsghdr {
	u64 len;
	int level;
	int type;
	int fd[3]; // SCM_RIGHTS: the worker's stderr until it has its log, its cgroup, its socket
};
struct clone_args {
	u64 flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
		set_tid_size, cgroup;
};

// A request's region: the child's stack until it execs or exits, the request (fixed room: the
// hive sends larger ones through its own fork instead) and the argv and envp laid out over it.
struct region {
	char guard[4096];      // PROT_NONE in a mapped region: a stack overflow faults
	char stack[16 << 10];  // from the top down; the child needs a few hundred bytes
	int busy;              // nonzero from before the clone until the kernel clears it
	long ctrl, err, sock;  // the descriptors the child rearranges (the zygote's numbering)
	char **argv, **envp;
	char *vec[4096];
	char msg[1 << 17];
};

#define MAXREGIONS 32
static struct region *regions[MAXREGIONS];
static int nregions;
static struct region forkregion; // for the copying clone: the child has its own copy of it

static inline long sys3(long n, long a, long b, long c) {
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}

static inline long sys6(long n, long a, long b, long c, long d, long e, long f) {
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	long r;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return r;
}

static __attribute__((noreturn)) void quit(int code) {
	for (;;) sys3(SYS_exit, code, 0, 0);
}

static u64 len(const char *s) {
	u64 n = 0;
	while (s[n]) n++;
	return n;
}

static void put(const char *s) { sys3(SYS_write, 2, (long)s, (long)len(s)); }

// The messages of Go's syscall.Errno for the errors execve can return, so that the log reads as it
// did with the hive's former Go trampoline.
static const char *errname(long e) {
	switch (e) {
	case 1: return "operation not permitted";
	case 2: return "no such file or directory";
	case 7: return "argument list too long";
	case 8: return "exec format error";
	case 12: return "cannot allocate memory";
	case 13: return "permission denied";
	case 14: return "bad address";
	case 20: return "not a directory";
	case 21: return "is a directory";
	case 22: return "invalid argument";
	case 17: return "file exists";
	case 24: return "too many open files";
	case 28: return "no space left on device";
	case 30: return "read-only file system";
	case 26: return "text file busy";
	case 36: return "file name too long";
	case 40: return "too many levels of symbolic links";
	case 122: return "disk quota exceeded";
	}
	return "unknown error";
}

static int listenpid(const char *e) {
	const char *p = "LISTEN_PID=";
	for (; *p; p++, e++)
		if (*e != *p) return 0;
	return 1;
}

static unsigned int u32at(const char *p) {
	const unsigned char *u = (const unsigned char *)p;
	return u[0] | u[1] << 8 | u[2] << 16 | (unsigned int)u[3] << 24;
}

// parse lays out the request of n bytes in r as argv (log, binary, arguments) and envp; 0 when
// malformed.
static int parse(struct region *r, long n) {
	u64 argc = u32at(r->msg), envc = u32at(r->msg + 4);
	if (argc + envc + 4 > sizeof r->vec / sizeof r->vec[0]) return 0;
	char *p = r->msg + 12, *end = r->msg + n;
	u64 k = 0;
	r->vec[k++] = "rbee-trampoline";
	for (u64 i = 0; i < 2 + argc + envc; i++) {
		if (p >= end) return 0;
		r->vec[k++] = p;
		while (p < end && *p) p++;
		if (p == end) return 0;
		p++;
		if (i == 1 + argc) r->vec[k++] = 0; // after the last argument
	}
	r->vec[k] = 0;
	r->argv = r->vec;
	r->envp = r->vec + 3 + argc + 1;
	return 1;
}

// newregion maps a region with its guard page; 0 when the kernel gives no memory.
static struct region *newregion(void) {
	long p = sys6(SYS_mmap, 0, sizeof(struct region), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p < 0 && p > -4096) return 0;
	sys3(SYS_mprotect, p, sizeof ((struct region *)0)->guard, 0);
	return (struct region *)p;
}

// freeregion returns a region no child uses, *vm set, or, when MAXREGIONS are in use (or no
// memory is left), the static one for a copying clone, *vm cleared.
static struct region *freeregion(int *vm) {
	*vm = 1;
	for (int i = 0; i < nregions; i++)
		if (!__atomic_load_n(&regions[i]->busy, __ATOMIC_ACQUIRE)) return regions[i];
	if (nregions < MAXREGIONS && (regions[nregions] = newregion())) return regions[nregions++];
	*vm = 0;
	return &forkregion;
}

// spawnclone is clone3(ca, size) whose child calls fn(r) on the stack ca names; fn never returns.
// It returns the child's PID, or a negative errno, in the caller only. The child starts at the
// instruction after the syscall with the registers of the caller but its own stack pointer, so it
// must not return into the caller's frame: this is assembly, as in the C libraries' clone
// wrappers (rcx is clobbered by the syscall, hence r in r8).
long spawnclone(struct clone_args *ca, u64 size, void (*fn)(struct region *), struct region *r);
__asm__(".text\n"
	"spawnclone:\n"
	"\tmov %rcx,%r8\n"
	"\tmov $435,%eax\n" // SYS_clone3
	"\tsyscall\n"
	"\ttest %rax,%rax\n"
	"\tjz 1f\n"
	"\tret\n"
	"1:\n"
	"\txor %ebp,%ebp\n" // the child: the outermost frame, on a 16-byte aligned stack top
	"\tmov %r8,%rdi\n"
	"\tcall *%rdx\n"
	"\tud2\n");

static __attribute__((noreturn)) void run(char **argv, char **envp);

// child is the zygote's child: its own session, the pipe as stderr, the socket as fd 3 (the
// cgroup's descriptor is close-on-exec), then what the trampoline does.
static __attribute__((noreturn)) void child(struct region *r) {
	sys3(SYS_close, r->ctrl, 0, 0);
	sys3(SYS_setsid, 0, 0, 0);
	if (sys3(SYS_dup3, r->err, 2, 0) < 0) quit(2);
	if (r->sock >= 0 && sys3(SYS_dup3, r->sock, 3, 0) < 0) quit(2);
	if (r->sock >= 0) sys3(SYS_close, r->sock, 0, 0);
	if (r->sock < 0) sys3(SYS_close, r->err, 0, 0); // else fd 3 is the socket now
	run(r->argv, r->envp);
}

// zygote serves requests until end of file.
static __attribute__((noreturn)) void zygote(void) {
	long ctrl = sys3(SYS_fcntl, 3, F_DUPFD_CLOEXEC, 100); // fd 3 is the worker's socket's place
	if (ctrl < 0) quit(2);
	sys3(SYS_close, 3, 0, 0);
	for (;;) {
		int vm;
		struct region *r = freeregion(&vm);
		if (!vm) {
			// A child may exec while the zygote waits for the request: look again once it
			// is there.
			struct {
				int fd;
				short events, revents;
			} pfd = {(int)ctrl, 1 /* POLLIN */, 0};
			sys3(SYS_poll, (long)&pfd, 1, -1);
			r = freeregion(&vm);
		}
		struct iovec iov = {r->msg, sizeof r->msg};
		struct cmsghdr cm = {0, 0, 0, {-1, -1, -1}};
		struct msghdr mh = {0, 0, &iov, 1, &cm, sizeof cm, 0};
		// The descriptors arrive close-on-exec, as the lowest free ones (3 and up).
		long n = sys3(SYS_recvmsg, ctrl, (long)&mh, MSG_CMSG_CLOEXEC);
		if (n == -EINTR) continue;
		if (n <= 0) quit(0);
		long nfd = 0;
		if (mh.controllen >= 16 + 4 && cm.len >= 16 + 4 && cm.level == SOL_SOCKET && cm.type == SCM_RIGHTS)
			nfd = (cm.len - 16) / 4;
		unsigned int flags = n >= 12 ? u32at(r->msg + 8) : 0;
		long reply = -EINVAL;
		if (n >= 12 && !(mh.flags & (MSG_TRUNC | MSG_CTRUNC)) && flags < 4 &&
		    nfd == 1 + (flags & 1) + (flags >> 1) && parse(r, n)) {
			// In the order sent, so err < cgroup < socket; fds 0-2 are open and ctrl is far
			// above, so the first is 3.
			r->ctrl = ctrl;
			r->err = cm.fd[0];
			r->sock = flags & 2 ? cm.fd[nfd - 1] : -1;
			struct clone_args ca = {CLONE_PARENT, 0, 0, 0, 0, (u64)r->stack, sizeof r->stack, 0, 0, 0, 0};
			if (flags & 1) {
				ca.flags |= CLONE_INTO_CGROUP;
				ca.cgroup = cm.fd[1];
			}
			if (vm) {
				// Set here, not by CLONE_CHILD_SETTID: the child may not have run when the
				// next request looks for a free region.
				ca.flags |= CLONE_VM | CLONE_CHILD_CLEARTID;
				ca.child_tid = (u64)&r->busy;
				__atomic_store_n(&r->busy, 1, __ATOMIC_RELEASE);
			}
			reply = spawnclone(&ca, sizeof ca, child, r);
			if (reply < 0 && vm) __atomic_store_n(&r->busy, 0, __ATOMIC_RELEASE);
		}
		for (long i = 0; i < nfd && i < 3; i++) sys3(SYS_close, cm.fd[i], 0, 0);
		if (sys3(SYS_write, ctrl, (long)&reply, sizeof reply) != sizeof reply) quit(0);
	}
}

__attribute__((used)) static void tmain(long *sp) {
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	char **envp = argv + argc + 1;
	if (argc == 1) quit(0);
	if (argc == 2 && argv[1][0] == '-' && argv[1][1] == 'z') zygote();
	if (argc < 4) quit(2);
	run(argv, envp);
}

// run opens the log, fills in LISTEN_PID and execs the worker: argv[1] the log, argv[2] the
// worker binary, argv[3..] its argv.
static __attribute__((noreturn)) void run(char **argv, char **envp) {
	if (argv[1][0]) {
		// As the hive's openWorkerLog: O_WRONLY|O_CREAT|O_APPEND|O_CLOEXEC|O_NOFOLLOW, the log
		// directory made again if it was removed, and a shared lock that tells the hive's sweep
		// the log is in use. Until the dup3s, stderr is a pipe the hive reads: a failure here
		// reaches the queen as the worker's exit reason.
		const long flags = 01 | 0100 | 02000 | 02000000 | 0400000;
		long fd = sys3(SYS_open, (long)argv[1], flags, 0644);
		if (fd == -2) { // ENOENT: make every missing directory above it, as os.MkdirAll
			char *slash = 0;
			for (char *p = argv[1]; *p; p++)
				if (*p == '/') slash = p;
			for (char *p = argv[1] + 1; slash && p <= slash; p++) {
				if (*p != '/') continue;
				*p = 0;
				sys3(SYS_mkdir, (long)argv[1], 0755, 0); // EEXIST and the rest: the open says
				*p = '/';
			}
			if (slash) fd = sys3(SYS_open, (long)argv[1], flags, 0644);
		}
		const char *op = "open ";
		long e = fd;
		if (fd >= 0 && (e = sys3(SYS_flock, fd, 1, 0)) < 0) op = "lock "; // LOCK_SH
		if (e < 0) {
			put("rbee hive: cannot give the worker its log file: ");
			put(op);
			put(argv[1]);
			put(": ");
			put(errname(-e));
			put("\n");
			quit(126);
		}
		// dup3 clears close-on-exec on the copies, so the worker inherits them as 1 and 2; the
		// second closes the pipe to the hive.
		if (sys3(SYS_dup3, fd, 1, 0) < 0 || sys3(SYS_dup3, fd, 2, 0) < 0) quit(126);
		sys3(SYS_close, fd, 0, 0);
	}
	for (char **e = envp; *e; e++) {
		if (!listenpid(*e)) continue;
		char *d = *e + 11;
		if (len(d) < 10) quit(2);
		char buf[20];
		int n = 0;
		for (u64 pid = sys3(SYS_getpid, 0, 0, 0); n == 0 || pid; pid /= 10) buf[n++] = '0' + pid % 10;
		while (n) *d++ = buf[--n];
		*d = 0;
	}
	long err = -sys3(SYS_execve, (long)argv[2], (long)(argv + 3), (long)envp);
	// stderr is the worker's log file: the reason lands where the operator looks.
	put("rbee hive trampoline: exec worker ");
	put(argv[2]);
	put(": ");
	put(errname(err));
	put("\n");
	quit(127);
}

__asm__(".text\n.globl _start\n_start:\n\txor %ebp,%ebp\n\tmov %rsp,%rdi\n\tand $-16,%rsp\n\tcall tmain\n\thlt\n");
