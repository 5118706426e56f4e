package main

// Disk files, snapshot chains and the Changed Block Tracking model.
//
// Per VM disk (device key) the model keeps the tree of disk files (descriptor
// + data file), which file is the VM's current backing, which file each
// snapshot froze, and the CBT state: an epoch (the UUID part of the changeId),
// a sequence number, and per sequence number the block hashes of the disk
// content that changeId names.

import (
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const blockSize = 64 * 1024

type blockHash [16]byte

type diskNode struct {
	desc   string // datastore path of the descriptor, "[ds] vm/disk-000001.vmdk"
	parent string // parent descriptor, "" for the base disk
	cid    string
}

type vdisk struct {
	key      int32
	base     string // base descriptor datastore path
	current  string // descriptor of the VM's running backing
	capacity int64
	uuid     string
	nodes    map[string]*diskNode

	// CBT
	epoch    string // "" when tracking is not active
	seq      int
	changeID string // changeId shown on the VM's current backing
	states   map[int][]blockHash
}

type snapRec struct {
	frozen   map[int32]string // device key → descriptor frozen by this snapshot
	changeID map[int32]string // device key → changeId of that frozen content ("" without CBT)
}

type vmModel struct {
	ref        types.ManagedObjectReference
	disks      map[int32]*vdisk
	snaps      map[string]*snapRec // by snapshot moref value
	cbtPending bool                // enabled in config, waiting for a stun/unstun
	cbtActive  bool
}

// ---------------------------------------------------------------- paths

func (a *App) localPath(dsPath string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(dsPath) {
		return "", fmt.Errorf("not a datastore path: %q", dsPath)
	}
	if p.Datastore != a.dsName {
		return "", fmt.Errorf("unknown datastore %q in %q", p.Datastore, dsPath)
	}
	return filepath.Join(a.dsDir, filepath.FromSlash(p.Path)), nil
}

// dataName is the data file of a disk file: "-flat" for a base disk (VMFS flat
// extent), "-delta" for a snapshot delta (VMFS vmfsSparse naming).
func dataName(desc string, delta bool) string {
	stem := strings.TrimSuffix(desc, ".vmdk")
	if delta {
		return stem + "-delta.vmdk"
	}
	return stem + "-flat.vmdk"
}

func (a *App) dataPath(vd *vdisk, desc string) (string, error) {
	n := vd.nodes[desc]
	return a.localPath(dataName(desc, n != nil && n.parent != ""))
}

// vmfsPath is how ESXi names a file in faults: /vmfs/volumes/<datastore>/<path>.
func (a *App) vmfsPath(dsPath string) string {
	var p object.DatastorePath
	p.FromString(dsPath)
	return "/vmfs/volumes/" + p.Datastore + "/" + p.Path
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x", b)
}

// newEpoch returns a changeId UUID part in vSphere's layout:
// "52 de c0 d9 98 b7 90 1a-bc 1f 6b 6f fd 75 df 4f".
func newEpoch() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[0] = 0x52
	h := make([]string, 16)
	for i, c := range b {
		h[i] = fmt.Sprintf("%02x", c)
	}
	return strings.Join(h[:8], " ") + "-" + strings.Join(h[8:], " ")
}

func diskUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	h := fmt.Sprintf("%x", b)
	return "6000C29" + h[7:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// ---------------------------------------------------------------- files

func (a *App) writeDescriptor(vd *vdisk, n *diskNode) error {
	lp, err := a.localPath(n.desc)
	if err != nil {
		return err
	}
	delta := n.parent != ""
	sectors := vd.capacity / 512
	var b strings.Builder
	b.WriteString("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\n")
	fmt.Fprintf(&b, "CID=%s\n", n.cid)
	if delta {
		fmt.Fprintf(&b, "parentCID=%s\ncreateType=\"vmfsSparse\"\n", vd.nodes[n.parent].cid)
		fmt.Fprintf(&b, "parentFileNameHint=%q\n", path.Base(dsRel(n.parent)))
		b.WriteString("\n# Extent description\n")
		fmt.Fprintf(&b, "RW %d VMFSSPARSE %q\n", sectors, path.Base(dsRel(dataName(n.desc, true))))
	} else {
		b.WriteString("parentCID=ffffffff\ncreateType=\"vmfs\"\n")
		b.WriteString("\n# Extent description\n")
		fmt.Fprintf(&b, "RW %d VMFS %q\n", sectors, path.Base(dsRel(dataName(n.desc, false))))
	}
	b.WriteString("\n# The Disk Data Base\n#DDB\n\n")
	b.WriteString("ddb.adapterType = \"lsilogic\"\n")
	fmt.Fprintf(&b, "ddb.geometry.cylinders = \"%d\"\nddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n", sectors/(255*63))
	fmt.Fprintf(&b, "ddb.longContentID = \"%s\"\n", randomHex(16))
	b.WriteString("ddb.thinProvisioned = \"1\"\n")
	fmt.Fprintf(&b, "ddb.uuid = \"%s\"\n", vmdkUUID(vd.uuid))
	b.WriteString("ddb.virtualHWVersion = \"13\"\n")
	return os.WriteFile(lp, []byte(b.String()), 0o644)
}

func dsRel(dsPath string) string {
	var p object.DatastorePath
	p.FromString(dsPath)
	return p.Path
}

func vmdkUUID(u string) string {
	h := strings.ReplaceAll(strings.ToLower(u), "-", "")
	parts := []string{}
	for i := 0; i+2 <= len(h); i += 2 {
		parts = append(parts, h[i:i+2])
	}
	if len(parts) != 16 {
		return u
	}
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}

// sparseCopy copies src to dst (created, truncated to size) copying only the
// data extents (SEEK_DATA/SEEK_HOLE), so holes stay holes; the kernel may
// reflink through copy_file_range.
func sparseCopy(src, dst string, size int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(size); err != nil {
		return err
	}
	for _, ext := range dataExtents(in, size) {
		if _, err := in.Seek(ext[0], io.SeekStart); err != nil {
			return err
		}
		if _, err := out.Seek(ext[0], io.SeekStart); err != nil {
			return err
		}
		if _, err := io.Copy(out, io.LimitReader(in, ext[1]-ext[0])); err != nil {
			return err
		}
	}
	return out.Sync()
}

const seekData, seekHole = 3, 4

// dataExtents lists [start, end) byte ranges holding data, below size.
func dataExtents(f *os.File, size int64) [][2]int64 {
	var out [][2]int64
	var off int64
	for off < size {
		start, err := f.Seek(off, seekData)
		if err != nil || start >= size {
			break // ENXIO: no data after off
		}
		end, err := f.Seek(start, seekHole)
		if err != nil || end > size {
			end = size
		}
		out = append(out, [2]int64{start, end})
		off = end
	}
	return out
}

func nblocks(capacity int64) int64 { return (capacity + blockSize - 1) / blockSize }

// allocatedBlocks marks every 64 KiB block touching a data extent.
func allocatedBlocks(file string, capacity int64) ([]bool, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := make([]bool, nblocks(capacity))
	for _, e := range dataExtents(f, capacity) {
		for b := e[0] / blockSize; b*blockSize < e[1] && b < int64(len(out)); b++ {
			out[b] = true
		}
	}
	return out, nil
}

// hashBlocks hashes every 64 KiB block of the content; holes hash as zeros, so
// the hashes compare content, not allocation.
func hashBlocks(file string, capacity int64) ([]blockHash, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	n := nblocks(capacity)
	out := make([]blockHash, n)
	zero := make([]byte, blockSize)
	blockLen := func(b int64) int64 {
		if (b+1)*blockSize > capacity {
			return capacity - b*blockSize
		}
		return blockSize
	}
	for b := int64(0); b < n; b++ {
		out[b] = hashOf(zero[:blockLen(b)])
	}
	buf := make([]byte, blockSize)
	for _, e := range dataExtents(f, capacity) {
		for b := e[0] / blockSize; b*blockSize < e[1] && b < n; b++ {
			l := blockLen(b)
			k, err := f.ReadAt(buf[:l], b*blockSize)
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, err
			}
			for i := k; i < int(l); i++ {
				buf[i] = 0
			}
			out[b] = hashOf(buf[:l])
		}
	}
	return out, nil
}

func hashOf(b []byte) blockHash {
	s := sha256.Sum256(b)
	var h blockHash
	copy(h[:], s[:16])
	return h
}

// ---------------------------------------------------------------- VM model

func vmObject(ref types.ManagedObjectReference) *simulator.VirtualMachine {
	vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	return vm
}

func diskDevices(vm *simulator.VirtualMachine) []*types.VirtualDisk {
	var out []*types.VirtualDisk
	for _, d := range vm.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok {
			if _, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
				out = append(out, disk)
			}
		}
	}
	return out
}

func diskSize(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

// model returns (creating it if needed) the model of a VM, and brings it in line
// with the VM's devices: new disks get their files, removed disks are dropped.
func (a *App) model(ref types.ManagedObjectReference) *vmModel {
	vm := vmObject(ref)
	if vm == nil {
		delete(a.vms, ref.Value)
		return nil
	}
	m := a.vms[ref.Value]
	if m == nil {
		m = &vmModel{ref: ref, disks: map[int32]*vdisk{}, snaps: map[string]*snapRec{}}
		a.vms[ref.Value] = m
	}
	seen := map[int32]bool{}
	for _, d := range diskDevices(vm) {
		seen[d.Key] = true
		if m.disks[d.Key] != nil {
			continue
		}
		b := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		vd := &vdisk{key: d.Key, base: b.FileName, current: b.FileName, capacity: diskSize(d),
			uuid: b.Uuid, nodes: map[string]*diskNode{}}
		if vd.uuid == "" {
			vd.uuid = diskUUID()
		}
		vd.nodes[vd.base] = &diskNode{desc: vd.base, cid: randomHex(4)}
		if err := a.initBaseFiles(vd); err != nil {
			log.Printf("disk %d of %s: %v", d.Key, ref.Value, err)
		}
		m.disks[d.Key] = vd
		if m.cbtActive {
			a.startEpoch(vd)
		}
	}
	for k := range m.disks {
		if !seen[k] {
			delete(m.disks, k)
		}
	}
	return m
}

// initBaseFiles gives a new base disk its descriptor and a sparse flat file of
// the disk's capacity (an existing flat file keeps its content).
func (a *App) initBaseFiles(vd *vdisk) error {
	flat, err := a.localPath(dataName(vd.base, false))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(flat), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(flat, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	st, _ := f.Stat()
	if st.Size() < vd.capacity {
		err = f.Truncate(vd.capacity)
	}
	_ = f.Close()
	if err != nil {
		return err
	}
	return a.writeDescriptor(vd, vd.nodes[vd.base])
}

// backing builds the backing info vSphere shows for desc: its fileName, the
// given changeId and the parent chain down to the base disk.
func (a *App) backing(vd *vdisk, desc, changeID string, tmpl *types.VirtualDiskFlatVer2BackingInfo) *types.VirtualDiskFlatVer2BackingInfo {
	b := &types.VirtualDiskFlatVer2BackingInfo{}
	if tmpl != nil {
		b.DiskMode = tmpl.DiskMode
		b.ThinProvisioned = tmpl.ThinProvisioned
		b.EagerlyScrub = tmpl.EagerlyScrub
		b.WriteThrough = tmpl.WriteThrough
		b.Split = tmpl.Split
		b.DigestEnabled = tmpl.DigestEnabled
		b.Datastore = tmpl.Datastore
		b.Sharing = tmpl.Sharing
	}
	if b.DiskMode == "" {
		b.DiskMode = string(types.VirtualDiskModePersistent)
	}
	b.FileName = desc
	b.Uuid = vd.uuid
	b.ChangeId = changeID
	if n := vd.nodes[desc]; n != nil {
		b.ContentId = n.cid
		if n.parent != "" {
			b.Parent = a.backing(vd, n.parent, "", tmpl)
		}
	}
	return b
}

// syncDevices writes the model's current backings into the VM's config.
func (a *App) syncDevices(m *vmModel) {
	vm := vmObject(m.ref)
	if vm == nil {
		return
	}
	simulator.Map.WithLock(vm, func() {
		devices := vm.Config.Hardware.Device
		for _, d := range diskDevices(vm) {
			vd := m.disks[d.Key]
			if vd == nil {
				continue
			}
			tmpl := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			d.Backing = a.backing(vd, vd.current, vd.changeID, tmpl)
			d.CapacityInBytes = vd.capacity
			d.CapacityInKB = vd.capacity / 1024
		}
		vm.Config.ChangeTrackingEnabled = types.NewBool(m.cbtActive || m.cbtPending)
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "config.hardware.device", Val: devices},
		})
	})
}

// freeDeltaName picks the lowest unused "<disk>-NNNNNN.vmdk" name.
func (a *App) freeDeltaName(vd *vdisk) string {
	stem := strings.TrimSuffix(vd.base, ".vmdk")
	for i := 1; ; i++ {
		name := fmt.Sprintf("%s-%06d.vmdk", stem, i)
		if vd.nodes[name] != nil {
			continue
		}
		lp, err := a.localPath(name)
		if err == nil {
			if _, err := os.Stat(lp); err == nil {
				continue
			}
		}
		return name
	}
}

// newDelta creates a delta disk file on top of parent whose data file is a
// sparse copy of the parent's content, and returns its descriptor name.
func (a *App) newDelta(vd *vdisk, parent string) (string, error) {
	name := a.freeDeltaName(vd)
	src, err := a.dataPath(vd, parent)
	if err != nil {
		return "", err
	}
	vd.nodes[name] = &diskNode{desc: name, parent: parent, cid: randomHex(4)}
	dst, err := a.dataPath(vd, name)
	if err != nil {
		return "", err
	}
	if err := sparseCopy(src, dst, vd.capacity); err != nil {
		delete(vd.nodes, name)
		return "", err
	}
	return name, a.writeDescriptor(vd, vd.nodes[name])
}

func (a *App) removeFiles(vd *vdisk, desc string) {
	if dp, err := a.dataPath(vd, desc); err == nil {
		_ = os.Remove(dp)
	}
	if lp, err := a.localPath(desc); err == nil {
		_ = os.Remove(lp)
	}
	delete(vd.nodes, desc)
}

// ---------------------------------------------------------------- CBT

func (a *App) startEpoch(vd *vdisk) {
	vd.epoch = newEpoch()
	vd.seq = 0
	vd.states = map[int][]blockHash{}
	a.recordCurrent(vd)
}

// recordCurrent records the running disk's content under a new changeId and
// makes it the current backing's changeId.
func (a *App) recordCurrent(vd *vdisk) {
	dp, err := a.dataPath(vd, vd.current)
	if err != nil {
		return
	}
	h, err := hashBlocks(dp, vd.capacity)
	if err != nil {
		log.Printf("hash %s: %v", dp, err)
		return
	}
	vd.seq++
	vd.states[vd.seq] = h
	vd.changeID = fmt.Sprintf("%s/%d", vd.epoch, vd.seq)
}

func (a *App) stopTracking(m *vmModel) {
	m.cbtActive = false
	for _, vd := range m.disks {
		vd.epoch, vd.seq, vd.states, vd.changeID = "", 0, nil, ""
	}
}

// stun is a stun/unstun point (power on, snapshot create/remove/revert):
// enabling CBT takes effect here.
func (a *App) stun(m *vmModel) {
	if m.cbtPending && !m.cbtActive {
		m.cbtPending = false
		m.cbtActive = true
		for _, vd := range m.disks {
			a.startEpoch(vd)
		}
	}
}

func (a *App) cbtReset(m *vmModel) {
	if !m.cbtActive && !m.cbtPending {
		return
	}
	m.cbtPending = false
	m.cbtActive = true
	for _, vd := range m.disks {
		a.startEpoch(vd)
	}
}

// ---------------------------------------------------------------- snapshots

func (a *App) snapshotCreated(m *vmModel, snap *simulator.VirtualMachineSnapshot) error {
	rec := &snapRec{frozen: map[int32]string{}, changeID: map[int32]string{}}
	for key, vd := range m.disks {
		frozen := vd.current
		cid := ""
		if m.cbtActive {
			dp, err := a.dataPath(vd, frozen)
			if err != nil {
				return err
			}
			h, err := hashBlocks(dp, vd.capacity)
			if err != nil {
				return err
			}
			vd.seq++
			vd.states[vd.seq] = h
			cid = fmt.Sprintf("%s/%d", vd.epoch, vd.seq)
			vd.changeID = cid
		}
		rec.frozen[key] = frozen
		rec.changeID[key] = cid
		delta, err := a.newDelta(vd, frozen)
		if err != nil {
			return err
		}
		vd.current = delta
	}
	m.snaps[snap.Self.Value] = rec
	a.setSnapshotDevices(m, snap, rec)
	a.stun(m)
	a.syncDevices(m)
	return nil
}

// setSnapshotDevices gives the snapshot's config its own copy of the devices, disks
// showing the frozen backing (fileName, changeId, parent chain). Called again when a
// consolidation renames the files a snapshot froze (vSphere's snapshot config then
// names the parent's files).
func (a *App) setSnapshotDevices(m *vmModel, snap *simulator.VirtualMachineSnapshot, rec *snapRec) {
	devices := make([]types.BaseVirtualDevice, 0, len(snap.Config.Hardware.Device))
	for _, d := range snap.Config.Hardware.Device {
		disk, ok := d.(*types.VirtualDisk)
		if !ok || m.disks[disk.Key] == nil {
			devices = append(devices, d)
			continue
		}
		c := *disk
		vd := m.disks[disk.Key]
		tmpl, _ := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		c.Backing = a.backing(vd, rec.frozen[disk.Key], rec.changeID[disk.Key], tmpl)
		c.CapacityInBytes = vd.capacity
		c.CapacityInKB = vd.capacity / 1024
		devices = append(devices, &c)
	}
	simulator.Map.WithLock(snap, func() {
		cfg := snap.Config
		cfg.Hardware.Device = devices
		cfg.ChangeTrackingEnabled = types.NewBool(m.cbtActive)
		snap.Config = cfg
	})
}

// referencers of a disk file: the snapshots that froze it and the VM's running disk.
func (a *App) retarget(m *vmModel, vd *vdisk, from, to string) {
	for _, rec := range m.snaps {
		if rec.frozen[vd.key] == from {
			rec.frozen[vd.key] = to
		}
	}
	if vd.current == from {
		vd.current = to
	}
	for _, n := range vd.nodes {
		if n.parent == from {
			n.parent = to
			_ = a.writeDescriptor(vd, n)
		}
	}
}

// snapshotRemoved consolidates like vSphere's snapshot delete: the frozen disk
// of the removed snapshot receives its only child's content (the child's files
// go away and whatever used the child now uses the parent's names). A frozen
// disk nobody needs any more is deleted; one with several children (a branch
// left by a revert) stays as the shared parent.
func (a *App) snapshotRemoved(m *vmModel, snapID string) error {
	rec := m.snaps[snapID]
	if rec == nil {
		return nil
	}
	delete(m.snaps, snapID)
	for key, frozen := range rec.frozen {
		vd := m.disks[key]
		if vd == nil || vd.nodes[frozen] == nil {
			continue
		}
		var children []string
		for name, n := range vd.nodes {
			if n.parent == frozen {
				children = append(children, name)
			}
		}
		stillUsed := vd.current == frozen
		for _, r := range m.snaps {
			if r.frozen[key] == frozen {
				stillUsed = true
			}
		}
		switch {
		case stillUsed:
		case len(children) == 0:
			a.removeFiles(vd, frozen)
		case len(children) == 1:
			child := children[0]
			from, err := a.dataPath(vd, child)
			if err != nil {
				return err
			}
			to, err := a.dataPath(vd, frozen)
			if err != nil {
				return err
			}
			if err := os.Rename(from, to); err != nil {
				return err
			}
			if lp, err := a.localPath(child); err == nil {
				_ = os.Remove(lp)
			}
			delete(vd.nodes, child)
			a.retarget(m, vd, child, frozen)
			for id, r := range m.snaps {
				if r.frozen[key] != frozen {
					continue
				}
				if obj, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: id}).(*simulator.VirtualMachineSnapshot); ok {
					a.setSnapshotDevices(m, obj, r)
				}
			}
		}
	}
	a.stun(m)
	a.syncDevices(m)
	return nil
}

// reverted makes the running disk a fresh delta on top of the snapshot's frozen
// disk (so its content is the snapshot's), discarding the old running delta.
func (a *App) reverted(m *vmModel, snapID string) error {
	rec := m.snaps[snapID]
	if rec == nil {
		return nil
	}
	for key, frozen := range rec.frozen {
		vd := m.disks[key]
		if vd == nil {
			continue
		}
		old := vd.current
		delta, err := a.newDelta(vd, frozen)
		if err != nil {
			return err
		}
		vd.current = delta
		if old != frozen && vd.nodes[old] != nil && vd.nodes[old].parent != "" {
			a.removeFiles(vd, old)
		}
		if m.cbtActive && vd.epoch != "" {
			a.recordCurrent(vd)
		}
	}
	a.stun(m)
	a.syncDevices(m)
	return nil
}

// snapshotsPostOrder lists a snapshot subtree children first.
func snapshotsPostOrder(tree []types.VirtualMachineSnapshotTree, out *[]string) {
	for _, t := range tree {
		snapshotsPostOrder(t.ChildSnapshotList, out)
		*out = append(*out, t.Snapshot.Value)
	}
}

func findSnapshot(tree []types.VirtualMachineSnapshotTree, id string) *types.VirtualMachineSnapshotTree {
	for i := range tree {
		if tree[i].Snapshot.Value == id {
			return &tree[i]
		}
		if t := findSnapshot(tree[i].ChildSnapshotList, id); t != nil {
			return t
		}
	}
	return nil
}

// ---------------------------------------------------------------- listing

type diskFile struct {
	Key        int32    `json:"key"`
	Label      string   `json:"label,omitempty"`
	FileName   string   `json:"fileName"`
	Path       string   `json:"path"`
	Descriptor string   `json:"descriptor"`
	Capacity   int64    `json:"capacity"`
	ChangeID   string   `json:"changeId"`
	Chain      []string `json:"chain"`
}

func (a *App) listDisks(m *vmModel) []diskFile {
	keys := make([]int, 0, len(m.disks))
	for k := range m.disks {
		keys = append(keys, int(k))
	}
	sort.Ints(keys)
	out := []diskFile{}
	for _, k := range keys {
		vd := m.disks[int32(k)]
		dp, _ := a.dataPath(vd, vd.current)
		lp, _ := a.localPath(vd.current)
		var chain []string
		for d := vd.current; d != ""; {
			chain = append(chain, d)
			n := vd.nodes[d]
			if n == nil {
				break
			}
			d = n.parent
		}
		out = append(out, diskFile{Key: vd.key, FileName: vd.current, Path: dp, Descriptor: lp,
			Capacity: vd.capacity, ChangeID: vd.changeID, Chain: chain})
	}
	return out
}
