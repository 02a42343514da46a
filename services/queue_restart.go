package services

import (
	"context"
	"fmt"
)

// ReleaseOrphanedClaims clears every claim on an undelivered row at start.
// It runs while this process holds the owner lock and before it listens,
// so every claim it finds was made by a previous process that can no
// longer push the row (after kill -9 its claims would otherwise hide the
// rows from the restored leases' drains until they expire). A row pushed
// but not yet confirmed when that process died is pushed again on its
// target's reattach, as M3 allows.
func (q *QueueService) ReleaseOrphanedClaims(ctx context.Context) (int64, error) {
	res := q.db.WithContext(ctx).Exec("UPDATE " + q.db.Table("message_queue") + " SET claimed_at = NULL, claim_id = NULL, claim_expires_at = NULL" +
		" WHERE delivered_at IS NULL AND claim_id IS NOT NULL")
	if res.Error != nil {
		return 0, fmt.Errorf("release claims of the previous process: %w", res.Error)
	}
	return res.RowsAffected, nil
}
