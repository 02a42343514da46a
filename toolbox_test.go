package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// End-to-end tests of the shared toolbox: each frame over a real socket,
// each refusal, on the embedded database and (TEST_DATABASE_URL) Postgres.

func withToolbox(f func(*config.Toolbox)) func(*config.Config) {
	return func(c *config.Config) { f(&c.Toolbox) }
}

// fastScheduler makes the scheduler re-read due rows every few ms, so a
// fake-clock advance is seen at once.
func fastScheduler(c *config.Config) { c.Toolbox.SchedulePoll = 10 * time.Millisecond }

// call sends frame and returns the decoded reply, failing on an error frame.
func call(t *testing.T, c *client.Client, frame map[string]any) map[string]any {
	t.Helper()
	f, err := c.Request(ctxT(t), frame)
	if err != nil {
		t.Fatalf("%v: %v", frame["type"], err)
	}
	var m map[string]any
	if err := f.Decode(&m); err != nil {
		t.Fatal(err)
	}
	if m["_reqId"] == nil {
		t.Fatalf("%v: reply %s does not echo _reqId", frame["type"], f.Raw)
	}
	return m
}

// refused sends frame and checks it is answered with an error frame of code.
func refused(t *testing.T, c *client.Client, code string, frame map[string]any) string {
	t.Helper()
	_, err := c.Request(ctxT(t), frame)
	var e *client.ErrorReply
	if !errors.As(err, &e) {
		t.Fatalf("%v: got %v, want error %s", frame["type"], err, code)
	}
	if e.Code != code {
		t.Fatalf("%v: error %s (%s), want %s", frame["type"], e.Code, e.Message, code)
	}
	return e.Message
}

func list(m map[string]any, key string) []map[string]any {
	raw, _ := m[key].([]any)
	out := make([]map[string]any, 0, len(raw))
	for _, r := range raw {
		out = append(out, r.(map[string]any))
	}
	return out
}

func (b *testBroker) count(table, where string, args ...any) int64 {
	b.t.Helper()
	var n int64
	if err := b.db.Raw(`SELECT count(*) FROM `+b.db.Table(table)+` WHERE `+where, args...).Scan(&n).Error; err != nil {
		b.t.Fatal(err)
	}
	return n
}

// noSecretsAudited checks no audit payload of the mesh carries any of texts.
func (b *testBroker) noSecretsAudited(meshID string, texts ...string) {
	b.t.Helper()
	var payloads []string
	col := "payload"
	if b.db.IsPostgres() {
		col = "payload::text"
	}
	if err := b.db.Raw(`SELECT `+col+` FROM `+b.db.Table("audit_log")+` WHERE mesh_id = ?`, meshID).Scan(&payloads).Error; err != nil {
		b.t.Fatal(err)
	}
	for _, p := range payloads {
		for _, s := range texts {
			if strings.Contains(p, s) {
				b.t.Fatalf("audit payload %s carries %q", p, s)
			}
		}
	}
}

func TestToolboxMemory(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withToolbox(func(l *config.Toolbox) { l.MaxMemories = 3; l.MaxItemBytes = 1024 }))
	f := b.fixture()
	alice, bob := b.connect(f.a, client.Options{}), b.connect(f.b, client.Options{})

	stored := call(t, alice, map[string]any{"type": "remember", "content": "the staging database password rotates every friday", "tags": []string{"ops", "db"}})
	id, _ := stored["id"].(string)
	if stored["type"] != "memory_stored" || id == "" || stored["memoryId"] != id {
		t.Fatalf("remember: %v", stored)
	}
	call(t, alice, map[string]any{"type": "remember", "content": "Deploys go out on Tuesdays"})

	got := call(t, bob, map[string]any{"type": "recall", "query": "When does the staging password rotate?"})
	mems := list(got, "memories")
	if got["type"] != "memory_results" || len(mems) != 1 || mems[0]["id"] != id || mems[0]["rememberedBy"] != "alice" {
		t.Fatalf("recall: %v", got)
	}
	if tags := mems[0]["tags"].([]any); len(tags) != 2 || tags[0] != "ops" {
		t.Fatalf("recall tags: %v", mems[0])
	}
	if _, err := time.Parse(time.RFC3339, mems[0]["rememberedAt"].(string)); err != nil {
		t.Fatalf("rememberedAt: %v", err)
	}
	// The daemon's shape follows, with the same _reqId.
	daemon := waitFrame(t, bob, 10*time.Second, func(f client.Frame) bool { return f.Type == "memory_recall_result" })
	var dm struct {
		Matches []protocol.MemoryView `json:"matches"`
		ReqID   string                `json:"_reqId"`
	}
	if err := daemon.Decode(&dm); err != nil || len(dm.Matches) != 1 || dm.Matches[0].ID != id || dm.ReqID == "" {
		t.Fatalf("memory_recall_result: %s", daemon.Raw)
	}

	// Nothing searchable: an empty answer, not an error.
	for _, q := range []string{"", "   ", "the and of it", "?!"} {
		if got := call(t, bob, map[string]any{"type": "recall", "query": q}); len(list(got, "memories")) != 0 {
			t.Fatalf("recall %q: %v", q, got)
		}
	}

	// Another mesh sees nothing and cannot forget.
	other := b.fixture()
	eve := b.connect(other.a, client.Options{})
	if got := call(t, eve, map[string]any{"type": "recall", "query": "staging password"}); len(list(got, "memories")) != 0 {
		t.Fatalf("recall across meshes: %v", got)
	}
	refused(t, eve, "not_found", map[string]any{"type": "forget", "memoryId": id})

	// Bad input changes nothing.
	refused(t, alice, "invalid_argument", map[string]any{"type": "remember"})
	refused(t, alice, "invalid_argument", map[string]any{"type": "remember", "content": "  "})
	refused(t, alice, "invalid_argument", map[string]any{"type": "remember", "content": 5})
	refused(t, alice, "invalid_argument", map[string]any{"type": "remember", "content": "x", "tags": "ops"})
	refused(t, alice, "limit_exceeded", map[string]any{"type": "remember", "content": strings.Repeat("x", 1025)})
	refused(t, alice, "limit_exceeded", map[string]any{"type": "remember", "content": "x", "tags": make([]string, 33)})
	refused(t, alice, "invalid_argument", map[string]any{"type": "recall", "query": 7})
	refused(t, alice, "limit_exceeded", map[string]any{"type": "recall", "query": strings.Repeat("word ", 33)})
	refused(t, alice, "limit_exceeded", map[string]any{"type": "recall", "query": strings.Repeat("x", 1025)})
	if n := b.count("memory", "mesh_id = ?", f.meshID); n != 2 {
		t.Fatalf("%d memories after refusals, want 2", n)
	}
	// The cap counts live memories.
	call(t, alice, map[string]any{"type": "remember", "content": "third"})
	refused(t, alice, "limit_exceeded", map[string]any{"type": "remember", "content": "fourth"})

	ack := call(t, bob, map[string]any{"type": "forget", "memoryId": id})
	if ack["type"] != "ack" || ack["id"] != id || ack["messageId"] != id || ack["queued"] != false {
		t.Fatalf("forget: %v", ack)
	}
	if got := call(t, bob, map[string]any{"type": "recall", "query": "staging password"}); len(list(got, "memories")) != 0 {
		t.Fatalf("recall returned a forgotten memory: %v", got)
	}
	refused(t, bob, "not_found", map[string]any{"type": "forget", "memoryId": id})
	refused(t, bob, "not_found", map[string]any{"type": "forget", "memoryId": "no-such-id"})
	refused(t, bob, "invalid_argument", map[string]any{"type": "forget"})
	call(t, alice, map[string]any{"type": "remember", "content": "room again after forget"})

	mem, tasks, err := b.toolbox.Counts(ctxT(t), f.meshID)
	if err != nil || mem != 3 || tasks.Open != 0 {
		t.Fatalf("counts: %d %+v %v", mem, tasks, err)
	}
	b.noSecretsAudited(f.meshID, "staging", "password", "Tuesdays")
}

func TestRecallRanking(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	ids := map[string]string{}
	for name, content := range map[string]string{
		"both-twice": "The deploy pipeline failed: the deploy pipeline needs the staging key to deploy",
		"both":       "Deploy pipeline notes for the mobile app",
		"deploy":     "We deploy from main every morning",
		"pipeline":   "The data pipeline runs nightly",
		"neither":    "Lunch is at noon",
	} {
		ids[call(t, alice, map[string]any{"type": "remember", "content": content})["id"].(string)] = name
	}
	names := func(q string) []string {
		var out []string
		for _, m := range list(call(t, alice, map[string]any{"type": "recall", "query": q}), "memories") {
			out = append(out, ids[m["id"].(string)])
		}
		return out
	}
	// All words must match (plainto_tsquery ANDs them), the denser match first.
	if got := names("deploy pipeline"); strings.Join(got, ",") != "both-twice,both" {
		t.Fatalf("recall deploy pipeline: %v", got)
	}
	// Stemming: "deploying" finds "deploy".
	if got := names("deploying"); len(got) != 3 || got[0] != "both-twice" {
		t.Fatalf("recall deploying: %v", got)
	}
	if got := names("pipelines"); len(got) != 3 || contains(got, "deploy") || contains(got, "neither") {
		t.Fatalf("recall pipelines: %v", got)
	}
	if got := names("noon lunch"); strings.Join(got, ",") != "neither" {
		t.Fatalf("recall noon lunch: %v", got)
	}
}

func TestToolboxTasks(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withToolbox(func(l *config.Toolbox) { l.MaxTasks = 3 }))
	f := b.fixture()
	alice, bob := b.connect(f.a, client.Options{}), b.connect(f.b, client.Options{})

	created := call(t, alice, map[string]any{"type": "create_task", "title": "fix the flaky test", "assignee": "bob", "priority": "high", "tags": []string{"ci"}})
	id, _ := created["id"].(string)
	if created["type"] != "task_created" || id == "" {
		t.Fatalf("create_task: %v", created)
	}
	other := call(t, alice, map[string]any{"type": "create_task", "title": "write docs"})["id"].(string)

	all := list(call(t, bob, map[string]any{"type": "list_tasks"}), "tasks")
	if len(all) != 2 || all[0]["id"] != other || all[1]["priority"] != "high" || all[0]["priority"] != "normal" ||
		all[1]["createdBy"] != "alice" || all[0]["assignee"] != nil || all[1]["status"] != "open" {
		t.Fatalf("list_tasks: %v", all)
	}
	if got := list(call(t, bob, map[string]any{"type": "list_tasks", "assignee": "bob"}), "tasks"); len(got) != 1 || got[0]["id"] != id {
		t.Fatalf("list_tasks assignee: %v", got)
	}

	claimed := call(t, bob, map[string]any{"type": "claim_task", "taskId": id})
	if claimed["type"] != "task_list" {
		t.Fatalf("claim_task: %v", claimed)
	}
	for _, tk := range list(claimed, "tasks") {
		if tk["id"] == id && (tk["status"] != "claimed" || tk["claimedBy"] != "bob") {
			t.Fatalf("claimed task: %v", tk)
		}
	}
	refused(t, alice, "task_not_claimable", map[string]any{"type": "claim_task", "taskId": id})
	refused(t, alice, "task_not_claimable", map[string]any{"type": "claim_task", "taskId": "nope"})
	if got := list(call(t, bob, map[string]any{"type": "list_tasks", "status": "open"}), "tasks"); len(got) != 1 || got[0]["id"] != other {
		t.Fatalf("list_tasks open: %v", got)
	}

	done := call(t, bob, map[string]any{"type": "complete_task", "taskId": id, "result": "quarantined the test"})
	for _, tk := range list(done, "tasks") {
		if tk["id"] == id && tk["status"] != "done" {
			t.Fatalf("completed task: %v", tk)
		}
	}
	var result string
	b.query(&result, `SELECT result FROM `+b.db.Table("task")+` WHERE id = ?`, id)
	if result != "quarantined the test" {
		t.Fatalf("stored result %q", result)
	}
	refused(t, bob, "task_not_found", map[string]any{"type": "complete_task", "taskId": "nope"})

	// Another mesh's ids are not found.
	eve := b.connect(b.fixture().a, client.Options{})
	refused(t, eve, "task_not_claimable", map[string]any{"type": "claim_task", "taskId": other})
	refused(t, eve, "task_not_found", map[string]any{"type": "complete_task", "taskId": other})
	if got := list(call(t, eve, map[string]any{"type": "list_tasks"}), "tasks"); len(got) != 0 {
		t.Fatalf("list_tasks across meshes: %v", got)
	}

	refused(t, alice, "invalid_argument", map[string]any{"type": "create_task"})
	refused(t, alice, "invalid_argument", map[string]any{"type": "create_task", "title": "x", "tags": []int{1}})
	refused(t, alice, "invalid_argument", map[string]any{"type": "claim_task"})
	refused(t, alice, "invalid_argument", map[string]any{"type": "list_tasks", "status": 3})
	call(t, alice, map[string]any{"type": "create_task", "title": "third"})
	refused(t, alice, "limit_exceeded", map[string]any{"type": "create_task", "title": "fourth"})
	if n := b.count("task", "mesh_id = ?", f.meshID); n != 3 {
		t.Fatalf("%d tasks, want 3", n)
	}
	_, counts, err := b.toolbox.Counts(ctxT(t), f.meshID)
	if err != nil || counts.Open != 2 || counts.Done != 1 || counts.Claimed != 0 {
		t.Fatalf("task counts %+v %v", counts, err)
	}
}

// Two sockets claim each task at the same moment: exactly one wins.
func TestTaskClaimRace(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice, bob := b.connect(f.a, client.Options{}), b.connect(f.b, client.Options{})
	for i := range 10 {
		id := call(t, alice, map[string]any{"type": "create_task", "title": fmt.Sprintf("task %d", i)})["id"].(string)
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for j, c := range []*client.Client{alice, bob} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[j] = c.Request(context.Background(), map[string]any{"type": "claim_task", "taskId": id})
			}()
		}
		wg.Wait()
		wins := 0
		for _, err := range errs {
			var e *client.ErrorReply
			switch {
			case err == nil:
				wins++
			case errors.As(err, &e) && e.Code == "task_not_claimable":
			default:
				t.Fatalf("claim: %v", err)
			}
		}
		if wins != 1 {
			t.Fatalf("task %d: %d claims won, want exactly 1", i, wins)
		}
	}
}

func TestToolboxContexts(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice, bob := b.connect(f.a, client.Options{}), b.connect(f.b, client.Options{})

	shared := call(t, alice, map[string]any{"type": "share_context", "summary": "Explored the Auth module", "filesRead": []string{"auth.go"}, "keyFindings": []string{"tokens never expire"}, "tags": []string{"auth"}})
	id, _ := shared["id"].(string)
	if shared["type"] != "context_shared" || id == "" {
		t.Fatalf("share_context: %v", shared)
	}
	change := waitFrame(t, bob, 10*time.Second, func(f client.Frame) bool { return f.Type == "state_change" })
	var sc protocol.StateChange
	_ = change.Decode(&sc)
	if sc.Key != "_context:alice" || string(sc.Value) != `"Explored the Auth module"` || sc.UpdatedBy != "alice" {
		t.Fatalf("state_change: %s", change.Raw)
	}
	// A second share replaces the member's row.
	if again := call(t, alice, map[string]any{"type": "share_context", "summary": "Explored the auth module and its tests", "tags": []string{"auth", "tests"}}); again["id"] != id {
		t.Fatalf("second share: %v, want id %s", again, id)
	}
	call(t, bob, map[string]any{"type": "share_context", "summary": "Read the billing code"})

	found := list(call(t, bob, map[string]any{"type": "get_context", "query": "AUTH"}), "contexts")
	if len(found) != 1 || found[0]["peerName"] != "alice" || found[0]["summary"] != "Explored the auth module and its tests" {
		t.Fatalf("get_context: %v", found)
	}
	if files, ok := found[0]["filesRead"].([]any); !ok || len(files) != 0 {
		t.Fatalf("filesRead after the replacing share: %v", found[0])
	}
	if got := list(call(t, bob, map[string]any{"type": "get_context", "query": "tests"}), "contexts"); len(got) != 1 {
		t.Fatalf("get_context by tag: %v", got)
	}
	if got := list(call(t, bob, map[string]any{"type": "get_context", "query": "100%"}), "contexts"); len(got) != 0 {
		t.Fatalf("get_context with a LIKE wildcard: %v", got)
	}
	all := list(call(t, bob, map[string]any{"type": "list_contexts"}), "contexts")
	if len(all) != 2 || all[0]["peerName"] != "bob" || all[0]["filesRead"] != nil {
		t.Fatalf("list_contexts: %v", all)
	}
	eve := b.connect(b.fixture().a, client.Options{})
	if got := list(call(t, eve, map[string]any{"type": "list_contexts"}), "contexts"); len(got) != 0 {
		t.Fatalf("list_contexts across meshes: %v", got)
	}
	refused(t, alice, "invalid_argument", map[string]any{"type": "share_context"})
	refused(t, alice, "invalid_argument", map[string]any{"type": "share_context", "summary": "x", "filesRead": "a.go"})
}

func TestToolboxSkills(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withToolbox(func(l *config.Toolbox) { l.MaxSkills = 2 }))
	f := b.fixture()
	alice, bob, carol := b.connect(f.a, client.Options{}), b.connect(f.b, client.Options{}), b.connect(f.c, client.Options{})

	ack := call(t, bob, map[string]any{"type": "share_skill", "name": "release", "description": "Cut a release", "instructions": "1. tag\n2. push", "tags": []string{"ops"}, "manifest": map[string]any{"version": 1}})
	if ack["type"] != "skill_ack" || ack["name"] != "release" || ack["action"] != "shared" {
		t.Fatalf("share_skill: %v", ack)
	}
	call(t, bob, map[string]any{"type": "share_skill", "name": "triage", "description": "Sort issues", "instructions": "label them"})
	call(t, bob, map[string]any{"type": "share_skill", "name": "release", "description": "Cut a release (v2)", "instructions": "1. tag\n2. push\n3. announce"})

	got := call(t, carol, map[string]any{"type": "get_skill", "name": "release"})
	skill, _ := got["skill"].(map[string]any)
	if got["type"] != "skill_data" || skill["instructions"] != "1. tag\n2. push\n3. announce" || skill["author"] != "bob" || skill["description"] != "Cut a release (v2)" {
		t.Fatalf("get_skill: %v", got)
	}
	if got := call(t, carol, map[string]any{"type": "get_skill", "name": "nope"}); got["skill"] != nil {
		t.Fatalf("get_skill of an unknown name: %v", got)
	}
	all := list(call(t, carol, map[string]any{"type": "list_skills"}), "skills")
	if len(all) != 2 || all[0]["name"] != "release" || all[1]["name"] != "triage" || all[0]["instructions"] != nil {
		t.Fatalf("list_skills: %v", all)
	}
	if got := list(call(t, carol, map[string]any{"type": "list_skills", "query": "ISSUE"}), "skills"); len(got) != 1 || got[0]["name"] != "triage" {
		t.Fatalf("list_skills search: %v", got)
	}
	if got := list(call(t, carol, map[string]any{"type": "list_skills", "query": "ops"}), "skills"); len(got) != 0 {
		t.Fatalf("list_skills by a tag the replacing share dropped: %v", got)
	}
	refused(t, bob, "limit_exceeded", map[string]any{"type": "share_skill", "name": "third", "description": "d", "instructions": "i"})

	// Only the author or an admin removes a skill.
	refused(t, carol, "forbidden", map[string]any{"type": "remove_skill", "name": "release"})
	if got := call(t, bob, map[string]any{"type": "remove_skill", "name": "release"}); got["action"] != "removed" {
		t.Fatalf("remove_skill by its author: %v", got)
	}
	if got := call(t, alice, map[string]any{"type": "remove_skill", "name": "triage"}); got["action"] != "removed" {
		t.Fatalf("remove_skill by an admin: %v", got)
	}
	if got := call(t, alice, map[string]any{"type": "remove_skill", "name": "triage"}); got["action"] != "not_found" {
		t.Fatalf("remove_skill twice: %v", got)
	}
	refused(t, bob, "invalid_argument", map[string]any{"type": "share_skill", "name": "x"})
	refused(t, bob, "invalid_argument", map[string]any{"type": "get_skill"})
	// Deploy stays out of scope.
	refused(t, bob, "unsupported", map[string]any{"type": "skill_deploy", "source": map[string]any{"type": "git"}})
}

func TestToolboxVault(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withToolbox(func(l *config.Toolbox) { l.MaxVaultEntries = 2 }))
	f := b.fixture()
	alice, bob := b.connect(f.a, client.Options{}), b.connect(f.b, client.Options{})
	secret := base64.StdEncoding.EncodeToString([]byte("sealed-bytes-the-broker-cannot-read"))

	ack := call(t, alice, map[string]any{"type": "vault_set", "key": "OPENAI_API_KEY", "ciphertext": secret, "nonce": "bm9uY2U=", "sealed_key": "c2VhbGVk", "entry_type": "env", "description": "for evals"})
	if ack["type"] != "vault_ack" || ack["key"] != "OPENAI_API_KEY" || ack["action"] != "stored" {
		t.Fatalf("vault_set: %v", ack)
	}
	call(t, alice, map[string]any{"type": "vault_set", "key": "cert", "ciphertext": "Y2VydA==", "nonce": "bg==", "sealed_key": "cw==", "entry_type": "file", "mount_path": "/etc/cert.pem"})
	refused(t, alice, "vault_error", map[string]any{"type": "vault_set", "key": "third", "ciphertext": "eA==", "nonce": "bg==", "sealed_key": "cw=="})
	// Replacing an entry is not a new one.
	call(t, alice, map[string]any{"type": "vault_set", "key": "cert", "ciphertext": "Y2VydDI=", "nonce": "bg==", "sealed_key": "cw==", "entry_type": "file", "mount_path": "/etc/cert.pem"})

	entries := list(call(t, alice, map[string]any{"type": "vault_list"}), "entries")
	if len(entries) != 2 || entries[0]["key"] != "OPENAI_API_KEY" || entries[0]["entry_type"] != "env" || entries[0]["ciphertext"] != nil ||
		entries[1]["mount_path"] != "/etc/cert.pem" || entries[0]["updated_at"] == nil {
		t.Fatalf("vault_list: %v", entries)
	}
	got := list(call(t, alice, map[string]any{"type": "vault_get", "keys": []string{"OPENAI_API_KEY", "missing"}}), "entries")
	if len(got) != 1 || got[0]["ciphertext"] != secret || got[0]["nonce"] != "bm9uY2U=" || got[0]["sealed_key"] != "c2VhbGVk" {
		t.Fatalf("vault_get: %v", got)
	}
	// Another member sees none of it.
	if got := list(call(t, bob, map[string]any{"type": "vault_list"}), "entries"); len(got) != 0 {
		t.Fatalf("vault_list of another member: %v", got)
	}
	if got := list(call(t, bob, map[string]any{"type": "vault_get", "keys": []string{"OPENAI_API_KEY"}}), "entries"); len(got) != 0 {
		t.Fatalf("vault_get of another member's key: %v", got)
	}
	if got := call(t, bob, map[string]any{"type": "vault_delete", "key": "OPENAI_API_KEY"}); got["action"] != "not_found" {
		t.Fatalf("vault_delete of another member's key: %v", got)
	}
	refused(t, alice, "vault_error", map[string]any{"type": "vault_set", "key": "k", "ciphertext": "eA==", "nonce": "bg==", "sealed_key": "cw==", "entry_type": "dir"})
	refused(t, alice, "vault_error", map[string]any{"type": "vault_set", "key": "k"})
	refused(t, alice, "invalid_argument", map[string]any{"type": "vault_get", "keys": "k"})
	if got := call(t, alice, map[string]any{"type": "vault_delete", "key": "OPENAI_API_KEY"}); got["action"] != "deleted" {
		t.Fatalf("vault_delete: %v", got)
	}
	if got := call(t, alice, map[string]any{"type": "vault_delete", "key": "OPENAI_API_KEY"}); got["action"] != "not_found" {
		t.Fatalf("vault_delete twice: %v", got)
	}
	b.noSecretsAudited(f.meshID, secret, "Y2VydA", "c2VhbGVk")
}

// nextMessage waits for a message push and returns it with its body decoded
// from the scheduled shape (base64 plaintext, empty nonce).
func nextMessage(t *testing.T, c *client.Client) (pushEvent, string) {
	t.Helper()
	p := decodePush(t, waitFrame(t, c, 10*time.Second, isMessage))
	if p.Nonce != "" {
		t.Fatalf("scheduled push with nonce %q", p.Nonce)
	}
	body, err := base64.StdEncoding.DecodeString(p.Ciphertext)
	if err != nil {
		t.Fatalf("scheduled body: %v", err)
	}
	// As the CLI's daemon does, so the row is not pushed again.
	if err := c.ClientAck(p.MessageID, ""); err != nil {
		t.Fatal(err)
	}
	return p, string(body)
}

func TestScheduleDelivers(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, fastScheduler)
	f := b.fixture()
	alice, bob, carol := b.connect(f.a, client.Options{}), b.connect(f.b, client.Options{}), b.connect(f.c, client.Options{})
	soon := func(d time.Duration) int64 { return b.now().Add(d).UnixMilli() }

	// To a peer's key, from a sender that went offline before the fire.
	ack := call(t, alice, map[string]any{"type": "schedule", "to": f.b.Pubkey(), "message": "stand-up in 5", "deliverAt": soon(time.Hour)})
	id, _ := ack["scheduledId"].(string)
	if at := int64(ack["deliverAt"].(float64)); ack["type"] != "scheduled_ack" || id == "" || at < soon(time.Hour)-5000 || at > soon(time.Hour) {
		t.Fatalf("schedule: %v", ack)
	}
	listed := list(call(t, alice, map[string]any{"type": "list_scheduled"}), "messages")
	if len(listed) != 1 || listed[0]["id"] != id || listed[0]["message"] != "stand-up in 5" || listed[0]["to"] != f.b.Pubkey() {
		t.Fatalf("list_scheduled: %v", listed)
	}
	if got := list(call(t, bob, map[string]any{"type": "list_scheduled"}), "messages"); len(got) != 0 {
		t.Fatalf("list_scheduled of another member: %v", got)
	}
	if got := call(t, bob, map[string]any{"type": "cancel_scheduled", "scheduledId": id}); got["ok"] != false {
		t.Fatalf("cancel of another member's schedule: %v", got)
	}
	b.exec(`UPDATE `+b.db.Table("scheduled_message")+` SET deliver_at = ? WHERE id = ?`, b.now().Add(300*time.Millisecond).UTC(), id)
	alice.Close()
	b.toolbox.Scheduler().Poke()
	p, body := nextMessage(t, bob)
	if body != "stand-up in 5" || p.SenderPubkey != f.a.Pubkey() || p.Priority != "now" || p.MeshID != f.meshID {
		t.Fatalf("scheduled push: %+v %q", p, body)
	}
	waitFor(t, 10*time.Second, "the fire's audit entry", func() bool { return b.auditCount(f.meshID, "schedule_fired") == 1 })
	if n := b.auditCount(f.meshID, "message_sent"); n != 1 {
		t.Fatalf("%d message_sent entries, want the send path's 1", n)
	}
	if _, _, body := httpDo(t, "GET", b.httpURL("/metrics"), ""); !strings.Contains(body, `meshbroker_scheduled_fires_total{late="false",outcome="queued"} 1`) {
		t.Fatalf("metrics lack the fire:\n%s", grepLines(body, "scheduled"))
	}

	// To everyone, and to a group.
	alice = b.connect(f.a, client.Options{})
	// join_group has no reply; the list_peers after it is answered once it applied.
	if err := carol.WriteJSON(map[string]any{"type": "join_group", "name": "ops"}); err != nil {
		t.Fatal(err)
	}
	if _, err := carol.ListPeers(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	call(t, alice, map[string]any{"type": "schedule", "to": "*", "message": "lunch", "deliverAt": soon(100 * time.Millisecond)})
	for _, c := range []*client.Client{bob, carol} {
		if _, body := nextMessage(t, c); body != "lunch" {
			t.Fatalf("broadcast body %q", body)
		}
	}
	call(t, alice, map[string]any{"type": "schedule", "to": "@ops", "message": "page rotation", "deliverAt": soon(100 * time.Millisecond)})
	if _, body := nextMessage(t, carol); body != "page rotation" {
		t.Fatalf("group body %q", body)
	}

	// To "self" from a CLI command: a member hello labelled with a made-up
	// session key, gone once the command exits; the reminder reaches the
	// member's other connections.
	label := client.NewSession().Pubkey()
	cli := b.connect(f.b, client.Options{SessionPubkey: label})
	call(t, cli, map[string]any{"type": "schedule", "to": label, "message": "reminder: ship it", "deliverAt": soon(200 * time.Millisecond), "subtype": "reminder"})
	cli.Close()
	if _, body := nextMessage(t, bob); body != "reminder: ship it" {
		t.Fatalf("self reminder body %q", body)
	}
	// A launched session's own key means that session, and is kept.
	sess := client.NewSession()
	launched := b.connect(f.b, client.Options{Session: &sess})
	call(t, launched, map[string]any{"type": "schedule", "to": sess.Pubkey(), "message": "for this session", "deliverAt": soon(200 * time.Millisecond)})
	if p, body := nextMessage(t, launched); body != "for this session" || p.SenderPubkey != f.b.Pubkey() {
		t.Fatalf("session reminder %+v %q", p, body)
	}
	if extra := collect(bob, 100*time.Millisecond, isMessage); len(extra) != 0 {
		t.Fatalf("the member's other socket got the session's reminder too: %d", len(extra))
	}

	// Cancel.
	later := call(t, alice, map[string]any{"type": "schedule", "to": f.b.Pubkey(), "message": "never", "deliverAt": soon(time.Hour)})["scheduledId"].(string)
	if got := call(t, alice, map[string]any{"type": "cancel_scheduled", "scheduledId": later}); got["type"] != "cancel_scheduled_ack" || got["ok"] != true || got["scheduledId"] != later {
		t.Fatalf("cancel_scheduled: %v", got)
	}
	if got := call(t, alice, map[string]any{"type": "cancel_scheduled", "scheduledId": later}); got["ok"] != false {
		t.Fatalf("second cancel: %v", got)
	}
	if got := call(t, alice, map[string]any{"type": "cancel_scheduled", "scheduledId": "no-such"}); got["ok"] != false {
		t.Fatalf("cancel of an unknown id: %v", got)
	}
	if got := list(call(t, alice, map[string]any{"type": "list_scheduled"}), "messages"); len(got) != 0 {
		t.Fatalf("list_scheduled after fires and cancel: %v", got)
	}
	b.noSecretsAudited(f.meshID, "stand-up", "lunch", "page rotation", "ship it", "never")
}

// A DM scheduled to a member that is offline waits in the queue for it.
func TestScheduledDMToOfflineMember(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, fastScheduler)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	id := call(t, alice, map[string]any{"type": "schedule", "to": f.c.Pubkey(), "message": "while you were out", "deliverAt": b.now().Add(50 * time.Millisecond).UnixMilli()})["scheduledId"].(string)
	waitFor(t, 10*time.Second, "the fire", func() bool {
		return b.count("scheduled_message", "id = ? AND fired_count = 1", id) == 1
	})
	carol := b.connect(f.c, client.Options{})
	if _, body := nextMessage(t, carol); body != "while you were out" {
		t.Fatalf("body %q", body)
	}
}

func TestScheduleRefusals(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withToolbox(func(l *config.Toolbox) { l.MaxSchedulesPerMember = 2; l.MaxItemBytes = 512 }),
		func(c *config.Config) { c.MaxMessageBytes = 700 })
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	now := b.now()
	base := func(kv ...any) map[string]any {
		m := map[string]any{"type": "schedule", "to": f.b.Pubkey(), "message": "hi"}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i].(string)] = kv[i+1]
		}
		return m
	}
	refused(t, alice, "invalid_argument", base("deliverAt", now.Add(-time.Minute).UnixMilli()))
	refused(t, alice, "invalid_argument", base("deliverAt", now.Add(367*24*time.Hour).UnixMilli()))
	refused(t, alice, "invalid_argument", base())
	refused(t, alice, "invalid_argument", base("deliverAt", "soon"))
	refused(t, alice, "invalid_argument", base("to", "", "deliverAt", now.Add(time.Hour).UnixMilli()))
	refused(t, alice, "invalid_argument", base("to", "#general", "deliverAt", now.Add(time.Hour).UnixMilli()))
	refused(t, alice, "invalid_argument", base("message", "", "deliverAt", now.Add(time.Hour).UnixMilli()))
	refused(t, alice, "limit_exceeded", base("message", strings.Repeat("x", 513), "deliverAt", now.Add(time.Hour).UnixMilli()))
	// 480 bytes fit the item cap but not MAX_MESSAGE_BYTES once encoded.
	refused(t, alice, "limit_exceeded", base("message", strings.Repeat("x", 480), "deliverAt", now.Add(time.Hour).UnixMilli()))
	for _, expr := range []string{"not a cron", "61 * * * *", "* * * * * *", "@every 10s", "0 0 30 2 *", "*/0 * * * *"} {
		msg := refused(t, alice, "invalid_cron", base("cron", expr, "deliverAt", 0))
		if !strings.Contains(msg, "Invalid cron expression") {
			t.Fatalf("cron %q: message %q", expr, msg)
		}
	}
	if n := b.count("scheduled_message", "mesh_id = ?", f.meshID); n != 0 {
		t.Fatalf("%d schedules stored by refused frames", n)
	}
	call(t, alice, base("deliverAt", now.Add(time.Hour).UnixMilli()))
	call(t, alice, base("cron", "0 9 * * 1", "deliverAt", 0))
	refused(t, alice, "limit_exceeded", base("deliverAt", now.Add(time.Hour).UnixMilli()))
	// Another member has its own allowance.
	bob := b.connect(f.b, client.Options{})
	call(t, bob, base("to", f.a.Pubkey(), "deliverAt", now.Add(time.Hour).UnixMilli()))
}

// A cron schedule fires once per tick of a fake clock, and a fire long
// past its time is flagged late.
func TestCronFiresOnEachTick(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, fastScheduler)
	f := b.fixture()
	alice, bob := b.connect(f.a, client.Options{}), b.connect(f.b, client.Options{})
	ack := call(t, alice, map[string]any{"type": "schedule", "to": f.b.Pubkey(), "message": "tick", "cron": "*/5 * * * *", "recurring": true, "deliverAt": 0})
	id := ack["scheduledId"].(string)
	if ack["cron"] != "*/5 * * * *" {
		t.Fatalf("scheduled_ack: %v", ack)
	}
	next := time.UnixMilli(int64(ack["deliverAt"].(float64)))
	if next.Minute()%5 != 0 || next.Second() != 0 || !next.After(b.now()) || next.Sub(b.now()) > 5*time.Minute {
		t.Fatalf("first fire %v (now %v)", next, b.now())
	}
	for tick := 1; tick <= 3; tick++ {
		b.advance(next.Sub(b.now()) + time.Second) // just past the tick
		fired, body := nextMessage(t, bob)
		if body != "tick" {
			t.Fatalf("tick %d body %q", tick, body)
		}
		waitFor(t, 10*time.Second, "the row to move on", func() bool {
			return b.count("scheduled_message", "id = ? AND fired_count = ?", id, tick) == 1
		})
		got := list(call(t, alice, map[string]any{"type": "list_scheduled"}), "messages")
		if len(got) != 1 || int(got[0]["firedCount"].(float64)) != tick || got[0]["cron"] != "*/5 * * * *" {
			t.Fatalf("list_scheduled after tick %d: %v", tick, got)
		}
		now := time.UnixMilli(int64(got[0]["deliverAt"].(float64)))
		if d := now.Sub(next); d != 5*time.Minute {
			t.Fatalf("tick %d: next fire %v after the last, want 5m", tick, d)
		}
		next = now
		// Nothing more fires before the next tick.
		if extra := collect(bob, 100*time.Millisecond, isMessage); len(extra) != 0 {
			t.Fatalf("tick %d fired %d extra messages (the tick's was %s), the first %s", tick, len(extra), fired.MessageID, extra[0].Raw)
		}
	}
	// The audit log is written behind the fire.
	waitFor(t, 10*time.Second, "three schedule_fired entries", func() bool { return b.auditCount(f.meshID, "schedule_fired") >= 3 })
	if n := b.auditCount(f.meshID, "schedule_fired"); n != 3 {
		t.Fatalf("%d schedule_fired entries, want 3", n)
	}
	b.noSecretsAudited(f.meshID, "tick\"")

	// Down for an hour: the missed ticks fire once, flagged late.
	b.advance(next.Sub(b.now()) + time.Hour)
	nextMessage(t, bob)
	waitFor(t, 10*time.Second, "a late fire", func() bool {
		var n int64
		b.query(&n, `SELECT count(*) FROM `+b.db.Table("audit_log")+` WHERE mesh_id = ? AND event_type = 'schedule_fired' AND `+jsonField(b, "payload", "late")+` = 'true'`, f.meshID)
		return n == 1
	})
	if extra := collect(bob, 200*time.Millisecond, isMessage); len(extra) != 0 {
		t.Fatalf("the missed ticks fired %d more times", len(extra))
	}
	var fired int
	b.query(&fired, `SELECT fired_count FROM `+b.db.Table("scheduled_message")+` WHERE id = ?`, id)
	if fired != 4 {
		t.Fatalf("fired_count %d, want 4", fired)
	}
}

// jsonField extracts a top-level field of a JSON column as text.
func jsonField(b *testBroker, col, field string) string {
	if b.db.IsPostgres() {
		return col + "->>'" + field + "'"
	}
	return "CASE json_extract(" + col + ", '$." + field + "') WHEN 1 THEN 'true' ELSE 'false' END"
}

// Before a hello a toolbox frame is refused like any other; after it,
// unknown fields are ignored and _reqId is echoed only when sent.
func TestToolboxFrameShapes(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	ws, err := client.Dial(ctxT(t), b.url(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	for _, typ := range []string{"remember", "schedule", "vault_list", "claim_task"} {
		if err := ws.WriteJSON(map[string]any{"type": typ, "content": "x", "_reqId": "r"}); err != nil {
			t.Fatal(err)
		}
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		var e protocol.ErrorFrame
		if err := ws.ReadJSON(&e); err != nil || e.Code != protocol.CodeNoHello {
			t.Fatalf("%s before hello: %+v %v", typ, e, err)
		}
	}
	if n := b.count("memory", "mesh_id = ?", f.meshID); n != 0 {
		t.Fatalf("%d memories stored before a hello", n)
	}
	alice := b.connect(f.a, client.Options{})
	raw, err := alice.Request(ctxT(t), map[string]any{"type": "remember", "content": "shape check", "extra": true})
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]json.RawMessage
	_ = raw.Decode(&m)
	if len(m) != 4 { // type, id, memoryId, _reqId
		t.Fatalf("memory_stored has keys %v", m)
	}
	// Without _reqId the reply has none.
	if err := alice.WriteJSON(map[string]any{"type": "list_tasks"}); err != nil {
		t.Fatal(err)
	}
	got := waitFrame(t, alice, 10*time.Second, func(f client.Frame) bool { return f.Type == "task_list" })
	if strings.Contains(string(got.Raw), "_reqId") {
		t.Fatalf("task_list without a request id: %s", got.Raw)
	}
}

// The CLI's cold path writes claim_task, complete_task, share_context and
// forget and closes the socket at once; each still takes effect.
func TestFireAndForgetBeforeClose(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	task := call(t, alice, map[string]any{"type": "create_task", "title": "cold path"})["id"].(string)
	mem := call(t, alice, map[string]any{"type": "remember", "content": "cold path memory"})["id"].(string)
	oneShot := func(frame map[string]any) {
		t.Helper()
		c := b.connect(f.b, client.Options{})
		if err := c.WriteJSON(frame); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	oneShot(map[string]any{"type": "claim_task", "taskId": task})
	waitFor(t, 10*time.Second, "the claim", func() bool { return b.count("task", "id = ? AND status = 'claimed'", task) == 1 })
	oneShot(map[string]any{"type": "complete_task", "taskId": task, "result": "done cold"})
	waitFor(t, 10*time.Second, "the completion", func() bool { return b.count("task", "id = ? AND status = 'done'", task) == 1 })
	oneShot(map[string]any{"type": "share_context", "summary": "cold share"})
	waitFor(t, 10*time.Second, "the context", func() bool { return b.count("context", "member_id = ?", f.b.MemberID) == 1 })
	oneShot(map[string]any{"type": "forget", "memoryId": mem})
	waitFor(t, 10*time.Second, "the forget", func() bool { return b.count("memory", "id = ? AND forgotten_at IS NOT NULL", mem) == 1 })
}

// Forgotten memories and finished schedules are deleted after PurgeAfter;
// live ones stay and stay searchable.
func TestToolboxPurge(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, fastScheduler)
	f := b.fixture()
	alice, bob := b.connect(f.a, client.Options{}), b.connect(f.b, client.Options{})
	keep := call(t, alice, map[string]any{"type": "remember", "content": "kept forever"})["id"].(string)
	gone := call(t, alice, map[string]any{"type": "remember", "content": "forgotten soon"})["id"].(string)
	call(t, alice, map[string]any{"type": "forget", "memoryId": gone})
	fired := call(t, alice, map[string]any{"type": "schedule", "to": f.b.Pubkey(), "message": "once", "deliverAt": b.now().UnixMilli()})["scheduledId"].(string)
	nextMessage(t, bob)
	cancelled := call(t, alice, map[string]any{"type": "schedule", "to": f.b.Pubkey(), "message": "no", "deliverAt": b.now().Add(time.Hour).UnixMilli()})["scheduledId"].(string)
	call(t, alice, map[string]any{"type": "cancel_scheduled", "scheduledId": cancelled})
	pending := call(t, alice, map[string]any{"type": "schedule", "to": f.b.Pubkey(), "message": "weekly", "cron": "0 9 * * 1", "deliverAt": 0})["scheduledId"].(string)
	waitFor(t, 10*time.Second, "the fire", func() bool { return b.count("scheduled_message", "id = ? AND fired_at IS NOT NULL", fired) == 1 })

	if err := b.toolbox.Purge(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if n := b.count("memory", "mesh_id = ?", f.meshID); n != 2 {
		t.Fatalf("a purge before PurgeAfter deleted memories: %d left", n)
	}
	b.advance(b.cfg.Toolbox.PurgeAfter + time.Hour)
	if err := b.toolbox.Purge(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if b.count("memory", "id = ?", gone) != 0 || b.count("memory", "id = ?", keep) != 1 {
		t.Fatal("purge: wrong memories deleted")
	}
	if b.count("scheduled_message", "id IN (?, ?)", fired, cancelled) != 0 || b.count("scheduled_message", "id = ?", pending) != 1 {
		t.Fatal("purge: wrong schedules deleted")
	}
	if got := list(call(t, bob, map[string]any{"type": "recall", "query": "kept"}), "memories"); len(got) != 1 || got[0]["id"] != keep {
		t.Fatalf("recall after the purge: %v", got)
	}
	if !b.db.IsPostgres() {
		var n int64
		b.query(&n, `SELECT count(*) FROM memory_fts WHERE memory_id = ?`, gone)
		if n != 0 {
			t.Fatal("the purged memory's index row is left")
		}
	}
}

// A schedule whose creator was revoked does not fire and is cancelled.
func TestScheduleOfRevokedMember(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, fastScheduler)
	f := b.fixture()
	bob, carol := b.connect(f.b, client.Options{}), b.connect(f.c, client.Options{})
	id := call(t, carol, map[string]any{"type": "schedule", "to": f.b.Pubkey(), "message": "from a leaver", "deliverAt": b.now().Add(time.Hour).UnixMilli()})["scheduledId"].(string)
	if _, err := services.NewProvisionService(b.db, time.Now).RevokeMember(ctxT(t), f.meshID, f.c.MemberID); err != nil {
		t.Fatal(err)
	}
	b.exec(`UPDATE `+b.db.Table("scheduled_message")+` SET deliver_at = ? WHERE id = ?`, b.now().UTC(), id)
	b.toolbox.Scheduler().Poke()
	waitFor(t, 10*time.Second, "the cancel", func() bool { return b.count("scheduled_message", "id = ? AND cancelled = true", id) == 1 })
	if got := collect(bob, 200*time.Millisecond, isMessage); len(got) != 0 {
		t.Fatalf("a revoked member's schedule was delivered: %d", len(got))
	}
	if n := b.count("message_queue", "sender_member_id = ?", f.c.MemberID); n != 0 {
		t.Fatalf("%d queue rows from the revoked member", n)
	}
}
