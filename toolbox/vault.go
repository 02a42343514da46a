package toolbox

import (
	"context"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// maxVaultKeys bounds one vault_get.
const maxVaultKeys = 100

// vaultErr is the reference's code for every vault refusal.
func vaultErr(err error) error {
	if e, ok := err.(*Error); ok {
		return &Error{Code: protocol.CodeVaultError, Msg: e.Msg}
	}
	return err
}

// VaultSet stores (or replaces) one of the caller's member's sealed
// entries. The broker keeps ciphertext, nonce and sealed key as given: it
// cannot read them and never logs or audits them.
func (t *Toolbox) VaultSet(ctx context.Context, c Caller, f *protocol.VaultSet) (string, error) {
	key, err := required("key", f.Key, maxNameBytes)
	if err != nil {
		return "", vaultErr(err)
	}
	ciphertext, err := required("ciphertext", f.Ciphertext, t.limits.MaxItemBytes)
	if err != nil {
		return "", vaultErr(err)
	}
	nonce, err := required("nonce", f.Nonce, maxNameBytes)
	if err != nil {
		return "", vaultErr(err)
	}
	sealed, err := required("sealed_key", f.SealedKey, t.limits.MaxItemBytes)
	if err != nil {
		return "", vaultErr(err)
	}
	entryType := "env"
	if f.EntryType != nil && *f.EntryType != "" {
		if *f.EntryType != "env" && *f.EntryType != "file" {
			return "", &Error{Code: protocol.CodeVaultError, Msg: "entry_type must be env or file"}
		}
		entryType = *f.EntryType
	}
	mount, err := optional("mount_path", f.MountPath, 1024)
	if err != nil {
		return "", vaultErr(err)
	}
	desc, err := optional("description", f.Description, 1024)
	if err != nil {
		return "", vaultErr(err)
	}
	s := t.store
	exists, err := s.count(ctx, "vault_entry", `mesh_id = ? AND member_id = ? AND "key" = ?`, c.MeshID, c.MemberID, key)
	if err != nil {
		return "", err
	}
	if exists == 0 {
		n, err := s.count(ctx, "vault_entry", "mesh_id = ? AND member_id = ?", c.MeshID, c.MemberID)
		if err != nil {
			return "", err
		}
		if n >= int64(t.limits.MaxVaultEntries) {
			return "", &Error{Code: protocol.CodeVaultError, Msg: "vault is full: delete an entry first"}
		}
	}
	now := t.now().UTC()
	if _, err := s.exec(ctx, `INSERT INTO `+s.table("vault_entry")+` (id, mesh_id, member_id, "key", ciphertext, nonce, sealed_key, entry_type, mount_path, description, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (mesh_id, member_id, "key") DO UPDATE SET ciphertext = excluded.ciphertext, nonce = excluded.nonce,
			sealed_key = excluded.sealed_key, entry_type = excluded.entry_type, mount_path = excluded.mount_path,
			description = excluded.description, updated_at = excluded.updated_at`,
		models.NewID(), c.MeshID, c.MemberID, key, ciphertext, nonce, sealed, entryType, strPtr(mount), strPtr(desc), now, now); err != nil {
		return "", err
	}
	t.audit.Record(c.MeshID, "vault_set", c.MemberID, c.DisplayName, map[string]any{"key": key, "entryType": entryType, "bytes": len(ciphertext)})
	return key, nil
}

type vaultRow struct {
	Key         string
	Ciphertext  string
	Nonce       string
	SealedKey   string
	EntryType   *string
	MountPath   *string
	Description *string
	UpdatedAt   time.Time
}

// VaultList lists the caller's member's entries, without their values.
func (t *Toolbox) VaultList(ctx context.Context, c Caller) ([]protocol.VaultEntryView, error) {
	var rows []vaultRow
	if err := t.store.raw(ctx, &rows, `SELECT "key", entry_type, mount_path, description, updated_at FROM `+t.store.table("vault_entry")+`
		WHERE mesh_id = ? AND member_id = ? ORDER BY "key"`, c.MeshID, c.MemberID); err != nil {
		return nil, err
	}
	out := make([]protocol.VaultEntryView, 0, len(rows))
	for _, r := range rows {
		out = append(out, protocol.VaultEntryView{Key: r.Key, EntryType: r.EntryType, MountPath: r.MountPath, Description: r.Description, UpdatedAt: iso(r.UpdatedAt)})
	}
	return out, nil
}

// VaultGet returns the caller's member's entries of the given keys, sealed
// values included; keys it has no entry for are left out.
func (t *Toolbox) VaultGet(ctx context.Context, c Caller, keys []string) ([]protocol.VaultEntryView, error) {
	out := []protocol.VaultEntryView{}
	if len(keys) == 0 {
		return out, nil
	}
	if len(keys) > maxVaultKeys {
		return nil, &Error{Code: protocol.CodeVaultError, Msg: "at most 100 keys per vault_get"}
	}
	var rows []vaultRow
	if err := t.store.raw(ctx, &rows, `SELECT "key", ciphertext, nonce, sealed_key, entry_type, mount_path FROM `+t.store.table("vault_entry")+`
		WHERE mesh_id = ? AND member_id = ? AND "key" IN ? ORDER BY "key"`, c.MeshID, c.MemberID, keys); err != nil {
		return nil, err
	}
	for _, r := range rows {
		r := r
		out = append(out, protocol.VaultEntryView{Key: r.Key, Ciphertext: &r.Ciphertext, Nonce: &r.Nonce, SealedKey: &r.SealedKey, EntryType: r.EntryType, MountPath: r.MountPath})
	}
	return out, nil
}

// VaultDelete deletes one of the caller's member's entries; false when it
// has none of that key.
func (t *Toolbox) VaultDelete(ctx context.Context, c Caller, key string) (bool, error) {
	if key == "" || len(key) > maxNameBytes {
		return false, &Error{Code: protocol.CodeVaultError, Msg: "key must be a non-empty string"}
	}
	n, err := t.store.exec(ctx, `DELETE FROM `+t.store.table("vault_entry")+` WHERE mesh_id = ? AND member_id = ? AND "key" = ?`, c.MeshID, c.MemberID, key)
	if err != nil {
		return false, err
	}
	if n > 0 {
		t.audit.Record(c.MeshID, "vault_deleted", c.MemberID, c.DisplayName, map[string]any{"key": key})
	}
	return n > 0, nil
}
