package models_test

import (
	"strings"
	"testing"

	"github.com/claudemesh/meshbroker/models"
)

const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

func TestNewIDFormat(t *testing.T) {
	seen := make(map[string]bool)
	for range 10000 {
		id := models.NewID()
		if len(id) != models.IDLength {
			t.Fatalf("%q: length %d", id, len(id))
		}
		if strings.Trim(id, alphabet) != "" {
			t.Fatalf("%q: character outside [0-9A-Za-z]", id)
		}
		if seen[id] {
			t.Fatalf("%q generated twice", id)
		}
		seen[id] = true
	}
}

// Every symbol is about equally likely, in every position. With modulo bias
// the first 8 symbols would be 1/31 (≈3%) more frequent; the bound here is
// far tighter than that would need and far looser than chance.
func TestNewIDDistribution(t *testing.T) {
	const n = 20000
	var counts [128]int
	var first [128]int
	for range n {
		id := models.NewID()
		first[id[0]]++
		for i := range len(id) {
			counts[id[i]]++
		}
	}
	expected := float64(n*models.IDLength) / 62
	var chi2 float64
	for _, c := range alphabet {
		d := float64(counts[c]) - expected
		chi2 += d * d / expected
		if d > expected*0.05 || d < -expected*0.05 {
			t.Errorf("symbol %q: %d occurrences, expected about %.0f", c, counts[c], expected)
		}
	}
	// 61 degrees of freedom: p = 1e-6 is at about 130.
	if chi2 > 130 {
		t.Errorf("chi-square %.1f over 61 degrees of freedom: not uniform", chi2)
	}
	for _, c := range alphabet {
		if first[c] == 0 {
			t.Errorf("symbol %q never appears first", c)
		}
	}
}
