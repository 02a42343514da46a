package main

import (
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/models"
)

// A restart gives the peers it cut off a full lease to come back, but a
// lease that was already running out when the broker stopped keeps only
// what was left of it: a client that closed normally (CLEAN_CLOSE_LEASE_MS)
// is not brought back for a full LEASE_TTL_MS by a deploy.
func TestRestartKeepsWhatWasLeftOfALease(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withCleanClose(time.Hour, 5*time.Second))
	f := b.fixture()
	label := client.NewSession()
	cli, err := b.tryConnect(f.a, client.Options{SessionPubkey: label.Pubkey(), SessionID: "cli-1"})
	if err != nil {
		t.Fatal(err)
	}
	dropped := b.connect(f.b, client.Options{SessionID: "daemon"})
	online := b.connect(f.c, client.Options{SessionID: "daemon"})
	if err := cli.Close(); err != nil {
		t.Fatal(err)
	}
	dropped.Kill()
	b.waitOffline(cli.HelloAck.PresenceID)
	b.waitOffline(dropped.HelloAck.PresenceID)
	b.stop()
	_ = online

	withStorage(t, b, func(db *models.DB) {
		var rows []struct {
			PresenceID string
			LeaseState string
			LeaseUntil *time.Time
		}
		if err := db.Raw("SELECT presence_id, lease_state, lease_until FROM " + db.Table("meshbroker_lease")).Scan(&rows).Error; err != nil {
			t.Fatal(err)
		}
		kept := map[string]bool{}
		for _, r := range rows {
			kept[r.PresenceID] = r.LeaseState == "held" && r.LeaseUntil != nil
		}
		if len(rows) != 3 || !kept[cli.HelloAck.PresenceID] || !kept[dropped.HelloAck.PresenceID] || kept[online.HelloAck.PresenceID] {
			t.Fatalf("leases at the stop (the clean close's 5 s may have run out first on a very slow machine): %+v", rows)
		}
	})

	b2 := reopen(t, b)
	waitFor(t, 30*time.Second, "the clean close's lease to end after the restart", func() bool {
		return b2.presence.Get(cli.HelloAck.PresenceID) == nil
	})
	for _, id := range []string{dropped.HelloAck.PresenceID, online.HelloAck.PresenceID} {
		if b2.presence.Get(id) == nil {
			t.Fatalf("lease %s ended with the clean close's; it had most of an hour left", id)
		}
	}
}
