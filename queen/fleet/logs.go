package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/queen/registry"
)

// Logs relays a worker's captured output from its hive: its last tailLines lines (0: the hive's
// default) and, with follow, what it writes next, until ctx ends or the hive ends the stream (the
// worker's processes are gone and its log is drained). The hive is found for live workers and for
// those removed lately (the registry's last removals), so a failed or deleted worker's log can be
// read as long as its hive keeps it.
func (f *Fleet) Logs(ctx context.Context, id string, tailLines uint32, follow bool, send func([]byte) error) error {
	if err := validate.ID("worker_id", id); err != nil {
		return &Error{Kind: KindInvalid, Msg: err.Error(), Err: err}
	}
	w, _, ok := f.reg.GetOrLast(id)
	if !ok {
		return errorf(KindNotFound, "worker %q is not known (the queen remembers removed workers until %d newer removals or its restart)", id, registry.RecentRemovals)
	}
	hive, ok := f.reg.GetHive(w.HiveID)
	if !ok {
		return errorf(KindNotFound, "hive %q of worker %s is not known to this queen", w.HiveID, id)
	}
	hc, err := f.cfg.Hives.Hive(hive.Address)
	if err != nil {
		return &Error{Kind: KindUnavailable, Msg: fmt.Sprintf("hive %s at %s: %v", hive.ID, hive.Address, err), Err: err}
	}
	stream, err := hc.Logs(ctx, &rbeev1.LogsRequest{WorkerId: id, Follow: follow, TailLines: tailLines})
	if err != nil {
		return hiveError(hive.ID, hive.Address, "logs", err)
	}
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return &Error{Kind: KindCanceled, Msg: "logs: " + ctx.Err().Error(), Err: ctx.Err()}
			}
			return hiveError(hive.ID, hive.Address, "logs", err)
		}
		if err := send(resp.GetData()); err != nil {
			return err
		}
	}
}
