package process

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Worker cgroups live at <cgroup2 mount><hive's own cgroup>/rbee-<hive-id>/w-<worker-id>.
//
//   - Under the hive's own cgroup, because that is the subtree the hive may write to (a delegated
//     systemd unit, a container's namespace root).
//   - One directory level per hive id so that two hives sharing a cgroup never collide, and the
//     "rbee-" prefix lets a restarted hive recognise a cgroup made by this package from
//     /proc/PID/cgroup alone: it keeps no list.
//   - The rbee-<hive-id> directory never holds processes and no controllers are enabled anywhere,
//     so the "no internal processes" rule of cgroup v2 is never in play.
//   - Leaves are prefixed "w-" so that no worker id can collide with an interface file (cgroup.kill).
//   - Cgroups outlive the hive process: a hive killed with -9 leaves its workers in place, and the
//     next hive finds them again through /proc/PID/cgroup.
const (
	hiveCgroupPrefix   = "rbee-"
	workerCgroupPrefix = "w-"
)

// cgroupRoot is where this hive creates worker cgroups: mount is the cgroup2 mount point, own the
// hive's cgroup path relative to it ("/" at the root).
type cgroupRoot struct {
	mount string
	own   string
}

// findCgroup2 locates a writable cgroup v2 hierarchy and this process's place in it; ok is false
// when there is none (cgroup v1 only, read-only mount, no permission).
func findCgroup2() (cgroupRoot, bool) {
	mount, err := cgroup2Mount()
	if err != nil || mount == "" {
		return cgroupRoot{}, false
	}
	own, err := ownCgroup(os.Getpid())
	if err != nil {
		return cgroupRoot{}, false
	}
	dir := filepath.Join(mount, own)
	if unix.Access(dir, unix.W_OK) != nil {
		return cgroupRoot{}, false
	}
	return cgroupRoot{mount: mount, own: own}, true
}

// cgroup2Mount returns the mount point of the cgroup2 file system from /proc/self/mountinfo (on a
// hybrid setup it is /sys/fs/cgroup/unified, on a pure v2 system /sys/fs/cgroup).
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// 41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
		line := sc.Text()
		sep := strings.Index(line, " - ")
		if sep < 0 {
			continue
		}
		post := strings.Fields(line[sep+3:])
		pre := strings.Fields(line[:sep])
		if len(post) < 1 || post[0] != "cgroup2" || len(pre) < 5 || pre[3] != "/" {
			continue
		}
		if strings.Contains(","+pre[5]+",", ",ro,") {
			continue
		}
		return unescapeMount(pre[4]), nil
	}
	return "", sc.Err()
}

// unescapeMount undoes the octal escapes (\040 for space) of mountinfo paths.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ownCgroup returns the cgroup v2 path ("0::" line) of process pid.
func ownCgroup(pid int) (string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return "", err
	}
	for _, line := range bytes.Split(b, []byte{'\n'}) {
		if rest, ok := bytes.CutPrefix(line, []byte("0::")); ok {
			return string(rest), nil
		}
	}
	return "", fmt.Errorf("no cgroup v2 entry in /proc/%d/cgroup", pid)
}

// workerCgroupName is the leaf name prefix of worker id's cgroups, up to and including the '@'
// that separates it from the per-spawn nonce.
func workerCgroupName(workerID string) string { return workerCgroupPrefix + workerID + "@" }

// isRbeeCgroup says whether a /proc/PID/cgroup path was made by this package: .../rbee-<hive>/w-<id>.
func isRbeeCgroup(p string) bool {
	return strings.HasPrefix(filepath.Base(filepath.Dir(p)), hiveCgroupPrefix) &&
		strings.HasPrefix(filepath.Base(p), workerCgroupPrefix)
}

// create makes a fresh cgroup for one worker and returns its path and an O_DIRECTORY descriptor
// for CLONE_INTO_CGROUP. The leaf is w-<worker-id>@<nonce>: ids cannot contain '@', so the worker
// id is recoverable from the name, and the nonce keeps a re-spawned worker id out of the cgroup an
// in-flight Delete of its predecessor is about to cgroup.kill.
func (r cgroupRoot) create(hiveID, workerID, nonce string) (string, int, error) {
	parent := filepath.Join(r.mount, r.own, hiveCgroupPrefix+hiveID)
	dir := filepath.Join(parent, workerCgroupName(workerID)+nonce)
	// The parent is made when the leaf's mkdir says it is missing: the first Spawn of a hive id,
	// or after an operator (or a test) removed it, also between the two mkdirs (hence the loop).
	// Most Spawns so make one directory, not two.
	for try := 0; ; try++ {
		err := os.Mkdir(dir, 0o755)
		if err == nil {
			break
		}
		if !errors.Is(err, os.ErrNotExist) || try > 1 {
			return "", -1, err
		}
		if err := os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return "", -1, err
		}
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Rmdir(dir)
		return "", -1, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return dir, fd, nil
}

// cgroupKill SIGKILLs every process in the cgroup, including those that left the worker's session
// or process group.
func cgroupKill(dir string) error {
	return os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
}

// cgroupGone says whether err from a cgroup's file means the cgroup has been removed: ENOENT when
// looked up afterwards, ENODEV when it was open (or being opened) at the removal.
func cgroupGone(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENODEV)
}

func cgroupPopulated(dir string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false, err
	}
	return parsePopulated(b), nil
}

func parsePopulated(b []byte) bool {
	for _, line := range bytes.Split(b, []byte{'\n'}) {
		if v, ok := bytes.CutPrefix(line, []byte("populated ")); ok {
			return string(bytes.TrimSpace(v)) == "1"
		}
	}
	return false
}

// waitCgroupEmpty waits until cgroup.events says "populated 0". The kernel notifies changes of
// that file with POLLPRI, so this sleeps in poll(2) and wakes on the change, not on a timer.
func waitCgroupEmpty(dir string, timeout time.Duration) error {
	fd, err := openEvents(dir)
	if err != nil {
		if cgroupGone(err) {
			return nil // already removed, so empty
		}
		return err
	}
	defer unix.Close(fd)
	return waitEventsEmpty(fd, dir, timeout)
}

// openEvents opens dir's cgroup.events for eventsPopulated and waitEventsEmpty.
func openEvents(dir string) (int, error) {
	fd, err := unix.Open(filepath.Join(dir, "cgroup.events"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: filepath.Join(dir, "cgroup.events"), Err: err}
	}
	return fd, nil
}

// eventsPopulated is cgroupPopulated through an open cgroup.events.
func eventsPopulated(fd int) (bool, error) {
	var buf [256]byte
	n, err := unix.Pread(fd, buf[:], 0)
	if err != nil {
		return false, err
	}
	return parsePopulated(buf[:n]), nil
}

// waitEventsEmpty is waitCgroupEmpty through dir's open cgroup.events, fd.
func waitEventsEmpty(fd int, dir string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 256)
	for {
		n, err := unix.Pread(fd, buf, 0)
		if err != nil {
			if cgroupGone(err) {
				return nil
			}
			return err
		}
		if !parsePopulated(buf[:n]) {
			return nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return errf(KindStuck, nil, "cgroup %s still populated %v after SIGKILL", dir, timeout)
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLPRI}}
		if _, err := unix.Poll(fds, ceilMillis(left)); err != nil && err != unix.EINTR {
			return err
		}
	}
}

// removeCgroup removes a worker cgroup once it is empty. The rbee-<hive-id> parent stays: other
// workers of the hive may be starting in it concurrently.
func removeCgroup(dir string) error {
	err := unix.Rmdir(dir)
	if err == nil || err == unix.ENOENT {
		return nil
	}
	return &os.PathError{Op: "rmdir", Path: dir, Err: err}
}

// liveCgroups counts the populated worker cgroups of hive hiveID (of every hive sharing this
// hive's cgroup when empty), children of this process or not.
func (r cgroupRoot) liveCgroups(hiveID string) int {
	hive := hiveCgroupPrefix + "*"
	if hiveID != "" {
		hive = hiveCgroupPrefix + hiveID
	}
	hives, _ := filepath.Glob(filepath.Join(r.mount, r.own, hive, workerCgroupPrefix+"*"))
	n := 0
	for _, d := range hives {
		if p, err := cgroupPopulated(d); err == nil && p {
			n++
		}
	}
	return n
}

// orphaned returns worker id's cgroups of hive hiveID that still hold processes although the
// worker's own process is gone: what its server forked, left behind when the worker was killed
// with no hive alive to reap it and kill its cgroup. A cgroup holding a process with the worker
// mark (workerMarked) is a live worker of that id and never returned; a process whose environment
// cannot be read counts as marked (ESRCH included: a live process exec'ing from a thread other
// than its leader answers so), so a doubt never kills. Session leadership is no mark: a server's
// helper that daemonised itself leads its own session too.
func (r cgroupRoot) orphaned(hiveID, workerID string) []string {
	dirs, _ := filepath.Glob(filepath.Join(r.mount, r.own, hiveCgroupPrefix+hiveID, workerCgroupName(workerID)+"*"))
	var out []string
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		if err != nil || len(bytes.TrimSpace(b)) == 0 {
			continue
		}
		live := false
		for _, pid := range strings.Fields(string(b)) {
			env, err := readWhole("/proc/" + pid + "/environ")
			switch {
			case errors.Is(err, os.ErrNotExist):
				// exited meanwhile: no mark
			case err != nil || len(env) == 0 || workerMarked(env, pid):
				live = true
			}
		}
		if !live {
			out = append(out, d)
		}
	}
	return out
}

// workerMarked says whether the environment env of process pid marks it as a worker itself rather
// than something it forked: LISTEN_PID naming itself (both trampolines set it, with or without a
// socket to hand over), the native trampoline's LISTEN_PID slot before it writes its PID there,
// the Go trampoline's variable, or the zygote's (a child it cloned, before the worker's exec).
func workerMarked(env []byte, pid string) bool {
	return hasEnv(env, envListenPID+"="+pid) || hasEnv(env, listenPIDSlot) ||
		hasEnvKey(env, envTrampoline) || hasEnvKey(env, envSpare)
}

func ceilMillis(d time.Duration) int {
	if d <= 0 {
		return 0
	}
	return int((d + time.Millisecond - 1) / time.Millisecond)
}
