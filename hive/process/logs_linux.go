package process

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"
)

// capLogsLoop keeps every worker log under LogMaxBytes. A coarse ticker is enough: this is
// housekeeping, and a log may exceed the cap by what a worker writes in one period.
func (m *Manager) capLogsLoop() {
	defer m.bg.Done()
	t := time.NewTicker(m.cfg.LogCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
			m.capLogs()
		}
	}
}

// capLogs caps every *.log file in LogDir, including those of workers spawned by an earlier hive.
func (m *Manager) capLogs() {
	paths, _ := filepath.Glob(filepath.Join(m.cfg.LogDir, "*.log"))
	for _, p := range paths {
		if err := capLog(p, m.cfg.LogMaxBytes); err != nil {
			m.log.Warn("cap worker log", zap.String("path", p), zap.Error(err))
		}
	}
}

// capLog keeps the last half of a log that has grown past max, starting at a line boundary. The
// worker writes with O_APPEND, so after the truncation its next write lands at the new end; lines
// written between reading the tail and truncating are lost, which a size cap tolerates.
func capLog(path string, max int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		if os.IsNotExist(err) {
			return nil
		}
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() <= max {
		return err
	}
	keep := max / 2
	tail := make([]byte, keep)
	n, err := f.ReadAt(tail, fi.Size()-keep)
	if err != nil && err != io.EOF {
		return err
	}
	tail = tail[:n]
	if i := bytes.IndexByte(tail, '\n'); i >= 0 && i+1 < len(tail) {
		tail = tail[i+1:]
	}
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err = f.WriteAt(tail, 0)
	return err
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
