// Package logging builds the zap loggers of rbee's programs: JSON lines when stderr, where they
// write, is not a terminal (journald, files, log shippers), coloured console lines when a person
// is watching.
package logging

import (
	"fmt"
	"os"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// New returns a logger for program writing to stderr at level ("debug", "info", "warn", "error").
func New(program, level string) (*zap.Logger, error) {
	var lvl zapcore.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	var cfg zap.Config
	// Decided by the stream the lines go to: `queen 2>log` on a terminal must still log JSON.
	if isTerminal(os.Stderr) {
		cfg = zap.NewDevelopmentConfig()
		cfg.EncoderConfig.EncodeLevel = zapcore.CapitalColorLevelEncoder
		cfg.DisableStacktrace = true
	} else {
		cfg = zap.NewProductionConfig()
		cfg.EncoderConfig.TimeKey = "time"
		cfg.EncoderConfig.EncodeTime = zapcore.RFC3339NanoTimeEncoder
		cfg.Sampling = nil // a narration line dropped by sampling is a gap in the story
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.OutputPaths = []string{"stderr"}
	cfg.ErrorOutputPaths = []string{"stderr"}
	l, err := cfg.Build()
	if err != nil {
		return nil, err
	}
	return l.With(zap.String("program", program)), nil
}
