package tiered

import "strings"

// clusterSlots is the number of hash slots of a Redis Cluster.
const clusterSlots = 16384

// keySlot returns the cluster hash slot of key: CRC16 (XMODEM) of the key,
// or of its hash tag (the part between the first "{" and the next "}", if
// not empty), modulo 16384.
func keySlot(key string) uint16 {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc % clusterSlots
}

// groupBySlot splits keys into groups whose Redis keys (prefix+key) share a
// cluster slot, keeping the order of first appearance. The groups hold the
// keys without prefix.
func groupBySlot(prefix string, keys []string) [][]string {
	var groups [][]string
	for _, g := range slotIndexes(prefix, keys) {
		group := make([]string, len(g))
		for i, j := range g {
			group[i] = keys[j]
		}
		groups = append(groups, group)
	}
	return groups
}

// slotIndexes is groupBySlot by index into keys.
func slotIndexes(prefix string, keys []string) [][]int {
	index := make(map[uint16]int)
	var groups [][]int
	for i, k := range keys {
		s := keySlot(prefix + k)
		g, ok := index[s]
		if !ok {
			g = len(groups)
			index[s] = g
			groups = append(groups, nil)
		}
		groups[g] = append(groups[g], i)
	}
	return groups
}
