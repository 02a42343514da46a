package models_test

import (
	"database/sql/driver"
	"encoding/json"
	"testing"

	"github.com/claudemesh/meshbroker/models"
)

func TestJSONValue(t *testing.T) {
	for _, tt := range []struct {
		name    string
		in      models.JSON
		want    driver.Value
		wantErr bool
	}{
		{"nil is SQL NULL", nil, nil, false},
		{"empty is SQL NULL", models.JSON{}, nil, false},
		{"JSON null stays JSON", models.JSON("null"), "null", false},
		{"object", models.JSON(`{"a": [1, 2]}`), `{"a": [1, 2]}`, false},
		{"invalid", models.JSON(`{"a":`), nil, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.in.Value()
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("Value() = %#v, %v; want %#v, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestJSONScan(t *testing.T) {
	buf := []byte(`{"x":1}`)
	var j models.JSON
	if err := j.Scan(buf); err != nil {
		t.Fatal(err)
	}
	buf[2] = 'y' // the driver may reuse its buffer
	if string(j) != `{"x":1}` {
		t.Errorf("Scan kept a reference to the driver's buffer: %s", j)
	}
	if err := j.Scan(`[1]`); err != nil || string(j) != `[1]` {
		t.Errorf("Scan(string) = %s, %v", j, err)
	}
	if err := j.Scan(nil); err != nil || j != nil {
		t.Errorf("Scan(nil) = %v, %v", j, err)
	}
	if err := j.Scan(42); err == nil {
		t.Error("Scan(int): want an error")
	}
}

func TestJSONInStructs(t *testing.T) {
	type wrapper struct {
		A models.JSON `json:"a"`
		B models.JSON `json:"b"`
	}
	out, err := json.Marshal(wrapper{A: models.JSON(`{"k":[1,2]}`)})
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != `{"a":{"k":[1,2]},"b":null}` {
		t.Errorf("Marshal = %s", out)
	}
	var back wrapper
	if err := json.Unmarshal(out, &back); err != nil {
		t.Fatal(err)
	}
	if string(back.A) != `{"k":[1,2]}` || string(back.B) != "null" {
		t.Errorf("Unmarshal = %s, %s", back.A, back.B)
	}
	var v map[string][]int
	if err := back.A.Decode(&v); err != nil || len(v["k"]) != 2 {
		t.Errorf("Decode = %v, %v", v, err)
	}
	if err := models.JSON(nil).Decode(&v); err == nil {
		t.Error("Decode of nil: want an error")
	}
	if got := models.MustJSON(map[string]int{"n": 1}); string(got) != `{"n":1}` {
		t.Errorf("MustJSON = %s", got)
	}
}
