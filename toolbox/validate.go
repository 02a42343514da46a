package toolbox

import (
	"strings"
	"unicode/utf8"
)

// maxTagBytes bounds one tag, file path or finding.
const maxTagBytes = 256

// maxNameBytes bounds identifiers: skill names, vault keys, ids, statuses.
const maxNameBytes = 256

// required returns *p, refusing a missing, empty or oversized value.
func required(field string, p *string, max int) (string, error) {
	if p == nil || strings.TrimSpace(*p) == "" {
		return "", invalid("%s must be a non-empty string", field)
	}
	if len(*p) > max {
		return "", limit("%s is %d bytes, more than the %d allowed", field, len(*p), max)
	}
	if !utf8.ValidString(*p) || strings.ContainsRune(*p, 0) {
		return "", invalid("%s must be valid text", field)
	}
	return *p, nil
}

// optional returns *p or "", refusing an oversized value.
func optional(field string, p *string, max int) (string, error) {
	if p == nil || *p == "" {
		return "", nil
	}
	return required(field, p, max)
}

// list checks an array of short strings.
func (t *Toolbox) list(field string, l []string) ([]string, error) {
	if len(l) > t.limits.MaxTags {
		return nil, limit("%s has %d entries, more than the %d allowed", field, len(l), t.limits.MaxTags)
	}
	out := make([]string, 0, len(l))
	for _, s := range l {
		if len(s) > maxTagBytes {
			return nil, limit("an entry of %s is %d bytes, more than the %d allowed", field, len(s), maxTagBytes)
		}
		if strings.ContainsRune(s, 0) {
			return nil, invalid("%s must hold valid text", field)
		}
		out = append(out, s)
	}
	return out, nil
}
