package process

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Worker logs. Each life of a worker gets a file of its own, named
//
//	<LogDir>/rbee-worker-<worker id>.<spawn time, UTC>.log
//
// so that a reused worker id never shows the previous process's output, and so that the hive can
// tell its files from anything else an operator keeps in --log-dir: only files matching that
// pattern are ever capped or removed. The trampoline takes a shared flock(2) on the file before
// the worker runs; the worker and everything it forks inherit the descriptor, so the lock is held
// exactly as long as some process can still write the log. That is how the hive (this one or a
// later one) tells a live worker's log from an exited one without any list of workers.
const (
	logPrefix = "rbee-worker-"
	logSuffix = ".log"
	// lifeLayout is fixed-width, so names sort by spawn time.
	lifeLayout = "20060102T150405.000000000Z"
)

// logName is the file name of one life of a worker's log.
func logName(workerID string, started time.Time) string {
	return logPrefix + workerID + "." + started.UTC().Format(lifeLayout) + logSuffix
}

// parseLogName returns the worker id of a file named by logName; ok is false for any other name.
func parseLogName(name string) (workerID string, ok bool) {
	rest, ok := strings.CutPrefix(name, logPrefix)
	if !ok {
		return "", false
	}
	rest, ok = strings.CutSuffix(rest, logSuffix)
	if !ok {
		return "", false
	}
	id, life, ok := strings.Cut(rest, ".")
	if !ok || checkID("worker id", id) != nil {
		return "", false
	}
	if _, err := time.Parse(lifeLayout, life); err != nil {
		return "", false
	}
	return id, true
}

// logFile is a log the hive caps: a live worker's. Followers read under mu's read lock and the
// cap rewrites the file under its write lock, so no reader sees a half-rewritten file; cut counts
// the bytes the caps have dropped from the front, so a follower can map its offset.
type logFile struct {
	mu      sync.RWMutex
	cut     atomic.Int64
	adopted bool // a worker of an earlier hive: untracked once its lock is free
}

// logs is the Manager's log bookkeeping: the files of live workers, and the logs of exited
// workers in the order they exited, so that a worker's exit removes the oldest log beyond
// LogKeepExited without listing the directory: a full scan opens and locks every log kept (100 by
// default), which cost a quarter of the hive's CPU in a Spawn/Delete loop and ran on every exit,
// next to the Spawn that follows.
type logs struct {
	mu      sync.Mutex
	tracked map[string]*logFile
	exited  []exitedLog     // oldest first
	isExit  map[string]bool // the paths in exited
}

// exitedLog is the log of an exited worker and when it was last written (or its worker exited).
type exitedLog struct {
	path string
	at   time.Time
}

func (m *Manager) track(path string, adopted bool) *logFile {
	m.logs.mu.Lock()
	defer m.logs.mu.Unlock()
	lf := m.logs.tracked[path]
	if lf == nil {
		lf = &logFile{adopted: adopted}
		m.logs.tracked[path] = lf
	}
	return lf
}

func (m *Manager) tracked(path string) *logFile {
	m.logs.mu.Lock()
	defer m.logs.mu.Unlock()
	return m.logs.tracked[path]
}

// untrack caps path one last time and stops watching it: its worker is gone, nothing writes it.
// The log joins the exited workers' logs, and the oldest of those beyond LogKeepExited goes.
func (m *Manager) untrack(path string) {
	if lf := m.tracked(path); lf != nil {
		m.capTracked(path, lf)
	}
	m.logs.mu.Lock()
	delete(m.logs.tracked, path)
	if path != "" && !m.logs.isExit[path] {
		m.logs.exited = append(m.logs.exited, exitedLog{path: path, at: time.Now()})
		m.logs.isExit[path] = true
	}
	var drop []string
	for len(m.logs.exited) > m.cfg.LogKeepExited {
		drop = append(drop, m.logs.exited[0].path)
		delete(m.logs.isExit, m.logs.exited[0].path)
		m.logs.exited = m.logs.exited[1:]
	}
	m.logs.mu.Unlock()
	for _, p := range drop {
		m.removeExitedLog(p)
	}
}

// removeExitedLog removes the log of an exited worker, unless something still writes it.
func (m *Manager) removeExitedLog(path string) {
	if err := removeDeadLog(path); err != nil {
		m.log.Warn("remove exited worker's log", zap.String("path", path), zap.Error(err))
		return
	}
	m.log.Debug("removed exited worker's log", zap.String("path", path))
}

// startLogs adopts the logs of live workers an earlier hive spawned (their files are still locked),
// removes expired ones and starts the housekeeping goroutine.
func (m *Manager) startLogs() {
	m.logs.tracked = make(map[string]*logFile)
	m.logs.isExit = make(map[string]bool)
	for _, e := range m.scanLogs() {
		if e.live {
			m.track(e.path, true)
		}
	}
	m.sweepLogs()
	m.bg.Add(1)
	go m.logsLoop()
}

// logsLoop caps the logs of live workers every LogCheckEvery and, every LogKeepFor/10 (at most 10
// minutes, at least 1s), removes the logs of exited workers past their bounds, also those it does
// not know of (another hive's sharing the directory). A worker's exit trims the count at once
// (untrack).
func (m *Manager) logsLoop() {
	defer m.bg.Done()
	capT := time.NewTicker(m.cfg.LogCheckEvery)
	defer capT.Stop()
	sweepT := time.NewTicker(max(min(m.cfg.LogKeepFor/10, 10*time.Minute), time.Second))
	defer sweepT.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-capT.C:
			m.capLogs()
		case <-sweepT.C:
			m.sweepLogs()
		}
	}
}

// capLogs caps the log of every live worker, and nothing else: the hive's own children and the
// workers of an earlier hive it adopted at start. An adopted log whose lock is free has lost its
// last writer and is no longer watched.
func (m *Manager) capLogs() {
	m.logs.mu.Lock()
	paths := make(map[string]*logFile, len(m.logs.tracked))
	for p, lf := range m.logs.tracked {
		paths[p] = lf
	}
	m.logs.mu.Unlock()
	for p, lf := range paths {
		m.capTracked(p, lf)
		if lf.adopted && !writerAlive(p) {
			m.untrack(p)
		}
	}
}

func (m *Manager) capTracked(path string, lf *logFile) {
	lf.mu.Lock()
	dropped, err := capLog(path, m.cfg.LogMaxBytes)
	lf.cut.Add(dropped)
	lf.mu.Unlock()
	if err != nil {
		m.log.Warn("cap worker log", zap.String("path", path), zap.Error(err))
	}
}

// capLog keeps the last half of a log that has grown past max, starting at a line boundary, and
// returns how many bytes it dropped from the front. The worker writes with O_APPEND, so after the
// truncation its next write lands at the new end; lines written between reading the tail and
// truncating are lost, which a size cap tolerates.
func capLog(path string, max int64) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOFOLLOW, 0)
	if err != nil {
		if os.IsNotExist(err) {
			return 0, nil
		}
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() || fi.Size() <= max {
		return 0, err
	}
	keep := max / 2
	tail := make([]byte, keep)
	n, err := f.ReadAt(tail, fi.Size()-keep)
	if err != nil && err != io.EOF {
		return 0, err
	}
	tail = tail[:n]
	if i := bytes.IndexByte(tail, '\n'); i >= 0 && i+1 < len(tail) {
		tail = tail[i+1:]
	}
	if err := f.Truncate(0); err != nil {
		return 0, err
	}
	if _, err = f.WriteAt(tail, 0); err != nil {
		return 0, err
	}
	return fi.Size() - int64(len(tail)), nil
}

// logEntry is one of this package's log files found in LogDir.
type logEntry struct {
	path, workerID string
	mtime          time.Time
	live           bool // some process still holds it open for writing (its lock)
}

// scanLogs lists this package's log files in LogDir, and nothing else found there.
func (m *Manager) scanLogs() []logEntry {
	d, err := os.Open(m.cfg.LogDir)
	if err != nil {
		return nil
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	var out []logEntry
	for _, name := range names {
		id, ok := parseLogName(name)
		if !ok {
			continue
		}
		p := filepath.Join(m.cfg.LogDir, name)
		fi, err := os.Lstat(p)
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		out = append(out, logEntry{path: p, workerID: id, mtime: fi.ModTime(), live: writerAlive(p)})
	}
	return out
}

// sweepLogs removes the logs of exited workers that are older than LogKeepFor, then, oldest
// first, those beyond the newest LogKeepExited. A live worker's log is never removed.
func (m *Manager) sweepLogs() {
	now := time.Now()
	var dead []logEntry
	for _, e := range m.scanLogs() {
		if e.live || m.tracked(e.path) != nil {
			continue
		}
		dead = append(dead, e)
	}
	slices.SortFunc(dead, func(a, b logEntry) int { return b.mtime.Compare(a.mtime) }) // newest first
	kept := make(map[string]time.Time, len(dead))
	for i, e := range dead {
		if i < m.cfg.LogKeepExited && now.Sub(e.mtime) < m.cfg.LogKeepFor {
			kept[e.path] = e.mtime
			continue
		}
		if err := removeDeadLog(e.path); err != nil {
			m.log.Warn("remove exited worker's log", zap.String("path", e.path), zap.Error(err))
			kept[e.path] = e.mtime
			continue
		}
		m.log.Debug("removed exited worker's log", zap.String("path", e.path), zap.String("worker_id", e.workerID))
	}
	// What the directory holds now is the list exits trim, with the logs of workers that exited
	// during the scan (which it saw as live), oldest first.
	m.logs.mu.Lock()
	defer m.logs.mu.Unlock()
	list := make([]exitedLog, 0, len(kept)+len(m.logs.exited))
	for p, at := range kept {
		list = append(list, exitedLog{path: p, at: at})
	}
	for _, e := range m.logs.exited {
		if _, ok := kept[e.path]; !ok && e.at.After(now) {
			list = append(list, e)
		}
	}
	slices.SortFunc(list, func(a, b exitedLog) int { return a.at.Compare(b.at) })
	clear(m.logs.isExit)
	for _, e := range list {
		m.logs.isExit[e.path] = true
	}
	m.logs.exited = list
}

// removeDeadLog unlinks path while holding its exclusive lock, so a log that came alive (cannot
// happen with fresh names, but costs nothing to rule out) is left alone.
func removeDeadLog(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		if os.IsNotExist(err) {
			return nil
		}
		return err
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return nil // a writer holds it: alive after all
	}
	return os.Remove(path)
}

// writerAlive says whether some process holds path's log lock, that is can still write to it.
func writerAlive(path string) bool {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return lockedByOthers(fd)
}

// lockedByOthers tries the exclusive lock on fd's open file and releases it at once: it fails
// while any writer holds its shared lock (or a cap or sweep holds it for a moment).
func lockedByOthers(fd int) bool {
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	unix.Flock(fd, unix.LOCK_UN)
	return false
}

// openWorkerLog is the trampoline's half: open (creating LogDir again if it was removed since the
// hive started) and lock the worker's log. Errors name the path and say what failed.
func openWorkerLog(path string) (int, error) {
	flags := unix.O_WRONLY | unix.O_CREAT | unix.O_APPEND | unix.O_CLOEXEC | unix.O_NOFOLLOW
	fd, err := unix.Open(path, flags, 0o644)
	if errors.Is(err, unix.ENOENT) {
		if merr := os.MkdirAll(filepath.Dir(path), 0o755); merr != nil {
			return -1, merr
		}
		fd, err = unix.Open(path, flags, 0o644)
	}
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: path, Err: err}
	}
	if err := unix.Flock(fd, unix.LOCK_SH); err != nil {
		unix.Close(fd)
		return -1, &os.PathError{Op: "lock", Path: path, Err: err}
	}
	return fd, nil
}

// logTail returns the last n lines of the log at path (from its last 16 KiB).
func logTail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	const window = 16 << 10
	off := max(fi.Size()-window, 0)
	buf := make([]byte, fi.Size()-off)
	k, _ := f.ReadAt(buf, off)
	buf = bytes.TrimRight(buf[:k], "\n")
	for i := len(buf) - 1; i >= 0; i-- {
		if buf[i] == '\n' {
			if n--; n == 0 {
				return string(buf[i+1:])
			}
		}
	}
	return string(buf)
}

// DefaultTailLines is how many lines Logs starts with when asked for 0.
const DefaultTailLines = 100

// logChunk bounds one piece Logs hands to send.
const logChunk = 32 << 10

// Logs sends the worker's current (or, for a worker that is gone, last) log: its last tailLines
// lines, then with follow what it writes next, until ctx ends or every process that could write
// the log is gone and the rest has been sent. send gets chunks of whole lines where possible; its
// error ends Logs. KindNotFound when this hive has no log of that worker.
func (m *Manager) Logs(ctx context.Context, workerID string, tailLines int, follow bool, send func([]byte) error) error {
	if err := checkID("worker id", workerID); err != nil {
		return err
	}
	if tailLines <= 0 {
		tailLines = DefaultTailLines
	}
	path, c := m.currentLog(workerID)
	if c != nil {
		select { // the trampoline has opened and locked the file, or failed to
		case <-c.logReady:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if path == "" {
		return errf(KindNotFound, nil, "no log of worker %q on this hive (never spawned here, or removed: logs of exited workers are kept %v, at most %d)",
			workerID, m.cfg.LogKeepFor, m.cfg.LogKeepExited)
	}
	// No symlinks: a planted link must not make the hive serve another file.
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		if os.IsNotExist(err) {
			if c != nil && c.logErr != "" {
				return errf(KindNotFound, nil, "worker %q has no log: %s", workerID, c.logErr)
			}
			return errf(KindNotFound, err, "log of worker %q removed", workerID)
		}
		return errf(KindInternal, err, "open log of worker %q", workerID)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return errf(KindInternal, err, "log of worker %q is not a regular file", workerID)
	}
	r := &logReader{f: f, lf: m.tracked(path), send: send}
	if err := r.startAtTail(tailLines); err != nil {
		return err
	}
	if err := r.drain(!follow); err != nil || !follow {
		return err
	}
	return r.follow(ctx, path)
}

// currentLog is the log of the worker's current life: the file of a live child of this Manager,
// else the newest file with its id in LogDir ("" if none).
func (m *Manager) currentLog(workerID string) (string, *child) {
	var newest *child
	m.mu.Lock()
	for _, c := range m.children {
		if c.workerID == workerID && (newest == nil || c.logPath > newest.logPath) {
			newest = c
		}
	}
	m.mu.Unlock()
	if newest != nil {
		return newest.logPath, newest
	}
	paths, _ := filepath.Glob(filepath.Join(m.cfg.LogDir, logPrefix+workerID+".*"+logSuffix))
	paths = slices.DeleteFunc(paths, func(p string) bool {
		id, ok := parseLogName(filepath.Base(p))
		return !ok || id != workerID
	})
	if len(paths) == 0 {
		return "", nil
	}
	return slices.Max(paths), nil // names sort by spawn time
}

// logReader reads one log from an offset, following the caps of a tracked log.
type logReader struct {
	f    *os.File
	lf   *logFile // nil: not capped (any more)
	seen int64    // lf.cut when off was last valid
	off  int64
	buf  []byte
	send func([]byte) error
}

func (r *logReader) lock() func() {
	if r.lf == nil {
		return func() {}
	}
	r.lf.mu.RLock()
	if d := r.lf.cut.Load() - r.seen; d > 0 { // a cap dropped d bytes from the front
		r.off, r.seen = max(r.off-d, 0), r.seen+d
	}
	return r.lf.mu.RUnlock
}

// startAtTail sets the offset to the start of the last n lines (a trailing newline does not count
// as a line of its own).
func (r *logReader) startAtTail(n int) error {
	if r.lf != nil {
		r.seen = r.lf.cut.Load()
	}
	unlock := r.lock()
	defer unlock()
	fi, err := r.f.Stat()
	if err != nil {
		return errf(KindInternal, err, "stat log")
	}
	end := fi.Size()
	block := make([]byte, 64<<10)
	pos, lines := end, 0
	for pos > 0 {
		k := min(int64(len(block)), pos)
		b := block[:k]
		if _, err := r.f.ReadAt(b, pos-k); err != nil && err != io.EOF {
			return errf(KindInternal, err, "read log")
		}
		for i := len(b) - 1; i >= 0; i-- {
			if b[i] != '\n' || pos-k+int64(i) == end-1 {
				continue
			}
			if lines++; lines == n {
				r.off = pos - k + int64(i) + 1
				return nil
			}
		}
		pos -= k
	}
	r.off = 0
	return nil
}

// drain sends everything from the offset to the current end of the file. Unless final, a chunk
// that fills the buffer is cut after its last newline, so chunks are whole lines where possible.
func (r *logReader) drain(final bool) error {
	if r.buf == nil {
		r.buf = make([]byte, logChunk)
	}
	for {
		unlock := r.lock()
		n, err := r.f.ReadAt(r.buf, r.off)
		unlock()
		if err != nil && err != io.EOF {
			return errf(KindInternal, err, "read log")
		}
		if n == 0 {
			return nil
		}
		chunk := r.buf[:n]
		if !final {
			// Whole lines only while the worker may still write: a line sent in two pieces could
			// be joined to the wrong text if a cap cuts the file between them. A line longer than
			// the buffer goes as it is.
			if i := bytes.LastIndexByte(chunk, '\n'); i >= 0 {
				chunk = chunk[:i+1]
			} else if n < len(r.buf) {
				return nil // the rest of the line comes with the next write, or the final drain
			}
		}
		if err := r.send(slices.Clone(chunk)); err != nil {
			return err
		}
		r.off += int64(len(chunk))
	}
}

// followRecheck bounds how long follow trusts inotify alone: it re-reads and re-checks the lock
// at least this often, so a missed event costs a second, not the stream.
const followRecheck = time.Second

// follow sends what is written to path until ctx ends or no process can write it any more (and
// all it wrote is sent). inotify wakes it on every write and when the last writer closes the file.
func (r *logReader) follow(ctx context.Context, path string) error {
	wait := pollWait
	if in, err := watchLog(path); err == nil {
		defer in.Close()
		stop := context.AfterFunc(ctx, func() { in.SetReadDeadline(time.Unix(1, 0)) })
		defer stop()
		ev := make([]byte, 4096)
		wait = func(context.Context) error {
			in.SetReadDeadline(time.Now().Add(followRecheck))
			if _, err := in.Read(ev); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				return err
			}
			return nil
		}
	}
	// else: out of inotify instances (fs.inotify.max_user_instances, 128 by default): poll.
	fd := int(r.f.Fd())
	for {
		if err := r.drain(false); err != nil {
			return err
		}
		if !lockedByOthers(fd) {
			return r.drain(true) // nobody writes any more: what is there is all there will be
		}
		err := wait(ctx)
		if ctx.Err() != nil {
			return nil // the caller's end: the normal way a follow stops
		}
		if err != nil {
			return errf(KindInternal, err, "watch log")
		}
	}
}

// pollWait is follow's wait without inotify.
func pollWait(ctx context.Context) error {
	t := time.NewTimer(followPoll)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
	return nil
}

// followPoll is how often a follow without inotify looks for new output.
const followPoll = 200 * time.Millisecond

// watchLog is newInotify; tests replace it to run follow without inotify.
var watchLog = newInotify

// newInotify watches path for writes and for the close of a writer, as a file the runtime's
// poller serves, so that a read on it honours deadlines.
func newInotify(path string) (*os.File, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, err
	}
	if _, err := unix.InotifyAddWatch(fd, path, unix.IN_MODIFY|unix.IN_CLOSE_WRITE|unix.IN_DELETE_SELF); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), "inotify:"+path), nil
}
