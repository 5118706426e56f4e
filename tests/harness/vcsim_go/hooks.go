package main

import (
	"fmt"
	"log"
	"os"
	"regexp"
	"strconv"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type preState struct {
	vm       types.ManagedObjectReference
	snaps    []string        // snapshots to consolidate (children first) / revert target
	resize   map[int32]int64 // device key → new capacity
	cbt      *bool           // spec.changeTrackingEnabled
	snapshot string          // CloneVM_Task: source snapshot
	source   *types.ManagedObjectReference
}

const noSpaceMsg = "There is not enough space on the file system for the selected operation."

// needSpace is what creating a disk takes from the datastore in the model: its
// capacity when thick, 1 MiB of metadata when thin.
func needSpace(d *types.VirtualDisk) int64 {
	if b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && b.ThinProvisioned != nil && *b.ThinProvisioned {
		return 1 << 20
	}
	return diskSize(d)
}

func (a *App) noSpace(need int64) (types.BaseMethodFault, string) {
	if a.freeSpace == nil || need <= *a.freeSpace {
		return nil, ""
	}
	return &types.NoDiskSpace{FileFault: types.FileFault{File: "[" + a.dsName + "]"}, Datastore: a.dsName}, noSpaceMsg
}

func (a *App) before(m *simulator.Method) (*preState, types.BaseMethodFault, string) {
	pre := &preState{}
	switch req := m.Body.(type) {
	case *types.CreateVM_Task:
		var need int64
		for _, dc := range req.Config.DeviceChange {
			s := dc.GetVirtualDeviceConfigSpec()
			if d, ok := s.Device.(*types.VirtualDisk); ok && s.FileOperation == types.VirtualDeviceConfigSpecFileOperationCreate {
				need += needSpace(d)
			}
		}
		if f, msg := a.noSpace(need); f != nil {
			return nil, f, msg
		}
	case *types.ReconfigVM_Task:
		pre.vm = req.This
		pre.cbt = req.Spec.ChangeTrackingEnabled
		pre.resize = map[int32]int64{}
		vm := a.model(req.This)
		var need int64
		for i, dc := range req.Spec.DeviceChange {
			s := dc.GetVirtualDeviceConfigSpec()
			d, ok := s.Device.(*types.VirtualDisk)
			if !ok {
				continue
			}
			switch s.Operation {
			case types.VirtualDeviceConfigSpecOperationAdd:
				if s.FileOperation == types.VirtualDeviceConfigSpecFileOperationCreate {
					need += needSpace(d)
				}
			case types.VirtualDeviceConfigSpecOperationEdit:
				if vm == nil || vm.disks[d.Key] == nil {
					continue
				}
				vd := vm.disks[d.Key]
				size := vd.capacity
				if d.CapacityInBytes > 0 && d.CapacityInBytes != vd.capacity {
					size = d.CapacityInBytes
				} else if d.CapacityInKB > 0 && d.CapacityInKB*1024 != vd.capacity {
					size = d.CapacityInKB * 1024
				}
				if size == vd.capacity {
					continue
				}
				bad := &types.InvalidDeviceOperation{InvalidDeviceSpec: types.InvalidDeviceSpec{DeviceIndex: int32(i)}}
				if size < vd.capacity {
					return nil, bad, fmt.Sprintf("Invalid operation for device '%d'.", i)
				}
				if len(vm.snaps) > 0 {
					// vSphere cannot extend a disk that has snapshots.
					return nil, bad, fmt.Sprintf("Invalid operation for device '%d'.", i)
				}
				pre.resize[d.Key] = size
				if b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); !ok || b.ThinProvisioned == nil || !*b.ThinProvisioned {
					need += size - vd.capacity
				}
			}
		}
		if f, msg := a.noSpace(need); f != nil {
			return nil, f, msg
		}
	case *types.RemoveSnapshot_Task:
		snap, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachineSnapshot)
		if !ok {
			return pre, nil, ""
		}
		pre.vm = snap.Vm
		vm := vmObject(snap.Vm)
		if vm == nil || vm.Snapshot == nil {
			return pre, nil, ""
		}
		node := findSnapshot(vm.Snapshot.RootSnapshotList, req.This.Value)
		if node != nil && req.RemoveChildren {
			snapshotsPostOrder(node.ChildSnapshotList, &pre.snaps)
		}
		pre.snaps = append(pre.snaps, req.This.Value)
	case *types.RemoveAllSnapshots_Task:
		pre.vm = req.This
		if vm := vmObject(req.This); vm != nil && vm.Snapshot != nil {
			snapshotsPostOrder(vm.Snapshot.RootSnapshotList, &pre.snaps)
		}
	case *types.RevertToSnapshot_Task:
		if snap, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachineSnapshot); ok {
			pre.vm = snap.Vm
			pre.snaps = []string{req.This.Value}
		}
	case *types.RevertToCurrentSnapshot_Task:
		pre.vm = req.This
		if vm := vmObject(req.This); vm != nil && vm.Snapshot != nil && vm.Snapshot.CurrentSnapshot != nil {
			pre.snaps = []string{vm.Snapshot.CurrentSnapshot.Value}
		}
	case *types.CloneVM_Task:
		src := req.This
		pre.source = &src
		if req.Spec.Snapshot != nil {
			pre.snapshot = req.Spec.Snapshot.Value
		}
		a.model(req.This)
	default:
		pre.vm = m.This
	}
	return pre, nil, ""
}

func (a *App) after(m *simulator.Method, pre *preState, task *simulator.Task) {
	var result types.ManagedObjectReference
	if task != nil {
		if r, ok := task.Info.Result.(types.ManagedObjectReference); ok {
			result = r
		}
	}
	var err error
	switch req := m.Body.(type) {
	case *types.CreateVM_Task:
		if vm := a.model(result); vm != nil {
			if req.Config.ChangeTrackingEnabled != nil && *req.Config.ChangeTrackingEnabled {
				vm.cbtPending = true
			}
			a.syncDevices(vm)
		}
	case *types.CloneVM_Task:
		err = a.cloned(*pre.source, pre.snapshot, result)
	case *types.ReconfigVM_Task:
		vm := a.model(req.This)
		if vm == nil {
			return
		}
		for key, size := range pre.resize {
			vd := vm.disks[key]
			if vd == nil {
				continue
			}
			vd.capacity = size
			if dp, e := a.dataPath(vd, vd.current); e == nil {
				if e := os.Truncate(dp, size); e != nil {
					err = e
				}
			}
			_ = a.writeDescriptor(vd, vd.nodes[vd.current])
			if vm.cbtActive {
				a.startEpoch(vd) // the model restarts tracking on a resize
			}
		}
		if pre.cbt != nil {
			if *pre.cbt {
				if !vm.cbtActive {
					vm.cbtPending = true
				}
			} else {
				vm.cbtPending = false
				a.stopTracking(vm)
			}
		}
		a.syncDevices(vm)
	case *types.CreateSnapshot_Task:
		snap, ok := simulator.Map.Get(result).(*simulator.VirtualMachineSnapshot)
		if vm := a.model(req.This); vm != nil && ok {
			err = a.snapshotCreated(vm, snap)
		}
	case *types.RemoveSnapshot_Task, *types.RemoveAllSnapshots_Task:
		if vm := a.model(pre.vm); vm != nil {
			for _, id := range pre.snaps {
				if e := a.snapshotRemoved(vm, id); e != nil {
					err = e
				}
			}
			a.stun(vm)
			a.syncDevices(vm)
		}
	case *types.RevertToSnapshot_Task, *types.RevertToCurrentSnapshot_Task:
		if vm := a.model(pre.vm); vm != nil && len(pre.snaps) == 1 {
			err = a.reverted(vm, pre.snaps[0])
		}
	case *types.PowerOnVM_Task, *types.ResetVM_Task:
		if vm := a.model(m.This); vm != nil {
			a.stun(vm)
			a.syncDevices(vm)
		}
	case *types.Destroy_Task:
		if m.This.Type == "VirtualMachine" {
			delete(a.vms, m.This.Value)
		}
	case *types.RefreshDatastore, *types.RefreshDatastoreStorageInfo:
		a.applyFreeSpace()
	}
	if err != nil {
		log.Printf("%s on %s: model update failed: %v", m.Name, m.This.Value, err)
	}
}

// cloned gives a clone's disks the source's content (at the snapshot when the
// clone spec names one). Linked clones are modelled as full sparse copies.
func (a *App) cloned(src types.ManagedObjectReference, snapID string, dst types.ManagedObjectReference) error {
	sm := a.model(src)
	dm := a.model(dst)
	if sm == nil || dm == nil {
		return nil
	}
	for key, dvd := range dm.disks {
		svd := sm.disks[key]
		if svd == nil {
			continue
		}
		from := svd.current
		if rec := sm.snaps[snapID]; rec != nil && rec.frozen[key] != "" {
			from = rec.frozen[key]
		}
		sp, err := a.dataPath(svd, from)
		if err != nil {
			return err
		}
		dp, err := a.dataPath(dvd, dvd.current)
		if err != nil {
			return err
		}
		if dvd.capacity < svd.capacity {
			dvd.capacity = svd.capacity
		}
		if err := sparseCopy(sp, dp, dvd.capacity); err != nil {
			return err
		}
		_ = a.writeDescriptor(dvd, dvd.nodes[dvd.current])
	}
	a.syncDevices(dm)
	return nil
}

func (a *App) applyFreeSpace() {
	for _, e := range simulator.Map.All("Datastore") {
		ds, ok := e.(*simulator.Datastore)
		if !ok || ds.Name != a.dsName {
			continue
		}
		simulator.Map.WithLock(ds, func() {
			if a.freeSpace == nil {
				_ = ds.RefreshDatastore(&types.RefreshDatastore{This: ds.Self})
				return
			}
			info := ds.Info.GetDatastoreInfo()
			info.FreeSpace = *a.freeSpace
			info.MaxFileSize = *a.freeSpace
			simulator.Map.Update(ds, []types.PropertyChange{{Name: "summary.freeSpace", Val: *a.freeSpace}})
		})
	}
}

// ---------------------------------------------------------------- QueryChangedDiskAreas

var changeIDRe = regexp.MustCompile(`^([0-9a-f]{2}(?: [0-9a-f]{2}){7}-[0-9a-f]{2}(?: [0-9a-f]{2}){7})/([0-9]+)$`)

func invalidArg(prop string) (*types.DiskChangeInfo, types.BaseMethodFault, string) {
	return nil, &types.InvalidArgument{InvalidProperty: prop}, "A specified parameter was not correct: " + prop
}

func (a *App) fileFault(desc string) (*types.DiskChangeInfo, types.BaseMethodFault, string) {
	p := a.vmfsPath(desc)
	return nil, &types.FileFault{File: p}, "Error caused by file " + p
}

func (a *App) queryChangedDiskAreas(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, types.BaseMethodFault, string) {
	vmObj := vmObject(req.This)
	if vmObj == nil {
		return nil, &types.ManagedObjectNotFound{Obj: req.This}, "The object has already been deleted or has not been completely created"
	}
	vm := a.model(req.This)
	vd := vm.disks[req.DeviceKey]
	if vd == nil {
		return invalidArg("deviceKey")
	}

	// The disk state the changes are computed for: a snapshot's frozen disk, or
	// the running disk (only allowed when the VM is powered off).
	target := vd.current
	targetID := vd.changeID
	if req.Snapshot != nil {
		snap, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
		if !ok {
			return nil, &types.ManagedObjectNotFound{Obj: *req.Snapshot}, "The object has already been deleted or has not been completely created"
		}
		rec := vm.snaps[req.Snapshot.Value]
		if snap.Vm != req.This || rec == nil {
			return invalidArg("snapshot")
		}
		if rec.frozen[vd.key] == "" {
			return invalidArg("deviceKey")
		}
		target, targetID = rec.frozen[vd.key], rec.changeID[vd.key]
	} else if vmObj.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		return nil, &types.InvalidPowerState{
			RequestedState: types.VirtualMachinePowerStatePoweredOff,
			ExistingState:  vmObj.Runtime.PowerState,
		}, "The attempted operation cannot be performed in the current state (Powered on)."
	}

	if req.StartOffset < 0 || req.StartOffset >= vd.capacity {
		return invalidArg("startOffset")
	}
	// No tracking, or the state to compare was not tracked in the current epoch:
	// ESXi fails reading the disk's change tracking file.
	if !vm.cbtActive || vd.epoch == "" || targetID == "" {
		return a.fileFault(target)
	}
	tm := changeIDRe.FindStringSubmatch(targetID)
	if tm == nil || tm[1] != vd.epoch {
		return a.fileFault(target)
	}
	targetSeq, _ := strconv.Atoi(tm[2])

	dp, err := a.dataPath(vd, target)
	if err != nil {
		return a.fileFault(target)
	}

	var changed []bool
	if req.ChangeId == "*" {
		changed, err = allocatedBlocks(dp, vd.capacity)
		if err != nil {
			return a.fileFault(target)
		}
	} else {
		cm := changeIDRe.FindStringSubmatch(req.ChangeId)
		if cm == nil {
			return invalidArg("changeId")
		}
		seq, _ := strconv.Atoi(cm[2])
		old, known := vd.states[seq]
		if cm[1] != vd.epoch || !known {
			return a.fileFault(target)
		}
		if seq > targetSeq {
			return invalidArg("changeId")
		}
		cur := vd.states[targetSeq]
		if req.Snapshot == nil || cur == nil {
			cur, err = hashBlocks(dp, vd.capacity)
			if err != nil {
				return a.fileFault(target)
			}
		}
		changed = make([]bool, len(cur))
		for i := range cur {
			changed[i] = i >= len(old) || old[i] != cur[i]
		}
	}
	return a.pageAreas(changed, vd.capacity, req.StartOffset), nil, ""
}

// pageAreas turns changed 64 KiB blocks into DiskChangeInfo from start: runs of
// blocks become areas, at most pageLimit of them; length stops after the last
// area returned when the page is full, so callers continue from
// startOffset+length.
func (a *App) pageAreas(changed []bool, capacity, start int64) *types.DiskChangeInfo {
	info := &types.DiskChangeInfo{StartOffset: start}
	b := start / blockSize
	n := int64(len(changed))
	for b < n {
		if !changed[b] {
			b++
			continue
		}
		e := b
		for e < n && changed[e] {
			e++
		}
		if len(info.ChangedArea) == a.pageLimit {
			// page full: stop before this area
			info.Length = b*blockSize - start
			if info.Length <= 0 {
				info.Length = 1
			}
			return info
		}
		as := b * blockSize
		if as < start {
			as = start
		}
		ae := e * blockSize
		if ae > capacity {
			ae = capacity
		}
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: as, Length: ae - as})
		b = e
	}
	info.Length = capacity - start
	return info
}
