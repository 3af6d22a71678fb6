package he

import (
	"bufio"
	"encoding/hex"
	"os"
	"strconv"
	"strings"
	"testing"
)

func readPairs(t *testing.T, path string) [][2]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out [][2]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 2 {
			t.Fatalf("%s: bad line %q", path, sc.Text())
		}
		out = append(out, [2]string{fields[0], fields[1]})
	}
	return out
}

// TestKnownAnswers re-derives the vectors in testdata (see testdata/README.md).
func TestKnownAnswers(t *testing.T) {
	presets := map[int]*Parameters{}
	for _, p := range Presets() {
		presets[p.LogN()] = p
	}
	ids := readPairs(t, "testdata/preset_ids.txt")
	if len(ids) != len(presets) {
		t.Fatalf("%d preset IDs for %d presets", len(ids), len(presets))
	}
	for _, kv := range ids {
		logN, _ := strconv.Atoi(kv[0])
		if p := presets[logN]; p == nil || string(p.ID()) != kv[1] {
			t.Errorf("preset N=2^%s: ID %v, want %s", kv[0], p, kv[1])
		}
	}
	for _, kv := range readPairs(t, "testdata/seeded_prng.txt") {
		key, err := hex.DecodeString(kv[0])
		if err != nil {
			t.Fatal(err)
		}
		out := make([]byte, 32)
		if _, err := seededPRNG(key).Read(out); err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(out) != kv[1] {
			t.Errorf("seeded stream for %s: %x, want %s", kv[0], out, kv[1])
		}
	}
	if got := hex.EncodeToString(rowSeed(make([]byte, 32), 1, 0)); got != strings.Repeat("0", 64)+"0000000100000000" {
		t.Errorf("row seed layout %s", got)
	}
}
