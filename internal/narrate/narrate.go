// Package narrate carries a call's logger (with its job id) through contexts and writes the
// lifecycle narration events that let one grep follow a worker across queen, hive and worker.
package narrate

import (
	"context"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

type loggerKey struct{}

// WithLogger returns a context whose Logger is l.
func WithLogger(ctx context.Context, l *zap.Logger) context.Context {
	return context.WithValue(ctx, loggerKey{}, l)
}

// Logger returns the context's logger, or the global zap logger when it has none.
func Logger(ctx context.Context) *zap.Logger {
	if l, ok := ctx.Value(loggerKey{}).(*zap.Logger); ok {
		return l
	}
	return zap.L()
}

// On says whether Event would write a line: callers skip building a message nobody reads.
func On(ctx context.Context) bool {
	return Logger(ctx).Core().Enabled(zapcore.InfoLevel)
}

// Event logs one lifecycle step at info level with the actor (queen, hive, worker) and action
// (worker_spawn_start, worker_delete_sigterm, ...) fields; the job id is already on the context's
// logger.
func Event(ctx context.Context, actor, action, msg string, fields ...zap.Field) {
	Logger(ctx).Info(msg, append(fields, zap.String("actor", actor), zap.String("action", action))...)
}

// Warn is Event at warn level, for steps that went wrong.
func Warn(ctx context.Context, actor, action, msg string, fields ...zap.Field) {
	Logger(ctx).Warn(msg, append(fields, zap.String("actor", actor), zap.String("action", action))...)
}
