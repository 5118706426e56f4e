package main

// SOAP interception: every POST to /sdk is decoded with the simulator's own
// decoder; the methods this launcher models are wrapped (pre-checks, fault
// injection, disk/CBT bookkeeping after the simulator has run them) or, for
// QueryChangedDiskAreas, answered here. Everything else goes straight to the
// simulator.

import (
	"bytes"
	"crypto/sha256"
	"encoding/pem"
	"encoding/xml"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type App struct {
	svc       *simulator.Service
	dsName    string
	dsDir     string
	dcName    string
	mu        sync.Mutex // serialises every modelled operation
	pageLimit int
	vms       map[string]*vmModel // by VM moref value
	faults    []*faultRule
	freeSpace *int64 // control-API override of the datastore's free space
}

func newApp(svc *simulator.Service, dsName, dsDir, dcName string, pageLimit int) *App {
	if pageLimit < 1 {
		pageLimit = 1
	}
	return &App{svc: svc, dsName: dsName, dsDir: dsDir, dcName: dcName, pageLimit: pageLimit,
		vms: map[string]*vmModel{}}
}

func (a *App) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/sdk" || r.URL.Path == "/sdk/vimService":
		a.serveSDK(w, r)
	case strings.HasPrefix(r.URL.Path, "/folder"):
		a.serveFolder(w, r)
	case strings.HasPrefix(r.URL.Path, "/transcend"):
		a.serveControl(w, r)
	default:
		a.svc.ServeMux.ServeHTTP(w, r)
	}
}

// modelled lists the SOAP methods this launcher wraps.
var modelled = map[string]bool{
	"QueryChangedDiskAreas":        true,
	"CreateVM_Task":                true,
	"CloneVM_Task":                 true,
	"ReconfigVM_Task":              true,
	"CreateSnapshot_Task":          true,
	"RemoveSnapshot_Task":          true,
	"RemoveAllSnapshots_Task":      true,
	"RevertToSnapshot_Task":        true,
	"RevertToCurrentSnapshot_Task": true,
	"PowerOnVM_Task":               true,
	"PowerOffVM_Task":              true,
	"ResetVM_Task":                 true,
	"Destroy_Task":                 true,
	"RefreshDatastore":             true,
	"RefreshDatastoreStorageInfo":  true,
	"ConsolidateVMDisks_Task":      true,
}

func (a *App) serveSDK(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		a.svc.ServeSDK(w, r)
		return
	}
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		a.svc.ServeSDK(w, r)
		return
	}

	a.mu.Lock()
	armed := a.faultArmed(method.Name)
	a.mu.Unlock()
	if method.Name == "Fetch" && !armed {
		a.fetch(w, r)
		return
	}
	if !modelled[method.Name] && !armed {
		a.svc.ServeSDK(w, r)
		return
	}

	a.mu.Lock()
	defer a.mu.Unlock()

	if !a.sessionOK(r) {
		// Let the simulator produce its own NotAuthenticated fault.
		r.Body = io.NopCloser(bytes.NewReader(body))
		a.svc.ServeSDK(w, r)
		return
	}

	vmRef := a.vmOf(method)
	if rule := a.takeFault(method.Name, vmRef); rule != nil {
		a.injectFault(w, method, rule)
		return
	}

	if method.Name == "QueryChangedDiskAreas" {
		req := method.Body.(*types.QueryChangedDiskAreas)
		info, fault, msg := a.queryChangedDiskAreas(req)
		if fault != nil {
			writeFault(w, msg, fault)
			return
		}
		writeResponse(w, "QueryChangedDiskAreasResponse", &types.QueryChangedDiskAreasResponse{Returnval: *info})
		return
	}

	pre, fault, msg := a.before(method)
	if fault != nil {
		if strings.HasSuffix(method.Name, "_Task") {
			a.failTask(w, method, fault, msg)
		} else {
			writeFault(w, msg, fault)
		}
		return
	}

	rec := httptest.NewRecorder()
	r.Body = io.NopCloser(bytes.NewReader(body))
	a.svc.ServeSDK(rec, r)

	if rec.Code == http.StatusOK {
		if task := taskOf(rec.Body.Bytes()); task != nil {
			t, ok := simulator.Map.Get(*task).(*simulator.Task)
			if ok {
				fixTaskEntity(t, vmRef)
			}
			if ok && t.Info.State == types.TaskInfoStateSuccess {
				a.after(method, pre, t)
			}
		} else {
			a.after(method, pre, nil)
		}
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

// fetch runs pyVmomi's single-property Fetch; the simulator panics when the
// property is unset (e.g. VirtualMachine.snapshot without snapshots), where
// vCenter answers with no value, which pyVmomi reads as None.
func (a *App) fetch(w http.ResponseWriter, r *http.Request) {
	rec := httptest.NewRecorder()
	panicked := func() (p bool) {
		defer func() {
			if v := recover(); v != nil {
				p = true
			}
		}()
		a.svc.ServeSDK(rec, r)
		return false
	}()
	if panicked {
		writeResponse(w, "FetchResponse", &struct{}{})
		return
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

var taskRe = regexp.MustCompile(`<returnval type="Task">([^<]+)</returnval>`)

func taskOf(resp []byte) *types.ManagedObjectReference {
	m := taskRe.FindSubmatch(resp)
	if m == nil {
		return nil
	}
	return &types.ManagedObjectReference{Type: "Task", Value: string(m[1])}
}

// sessionOK asks the simulator whether the request's session cookie belongs to a
// logged-in session, by replaying a CurrentTime call (which needs a session).
func (a *App) sessionOK(r *http.Request) bool {
	const probe = `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime></soapenv:Body></soapenv:Envelope>`
	req := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(probe))
	for _, c := range r.Cookies() {
		req.AddCookie(c)
	}
	if v := r.Header.Get("vmware_soap_session"); v != "" {
		req.Header.Set("vmware_soap_session", v)
	}
	rec := httptest.NewRecorder()
	a.svc.ServeSDK(rec, req)
	return rec.Code == http.StatusOK
}

// vmOf returns the VM a request acts on: _this for VM methods, the snapshot's VM
// for snapshot methods.
func (a *App) vmOf(m *simulator.Method) string {
	switch m.This.Type {
	case "VirtualMachine":
		return m.This.Value
	case "VirtualMachineSnapshot":
		if s, ok := simulator.Map.Get(m.This).(*simulator.VirtualMachineSnapshot); ok {
			return s.Vm.Value
		}
	}
	return ""
}

const envelopeStart = `<?xml version="1.0" encoding="UTF-8"?>` +
	`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" ` +
	`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
	`xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">` +
	`<soapenv:Body>`
const envelopeEnd = `</soapenv:Body></soapenv:Envelope>`

func writeResponse(w http.ResponseWriter, element string, res interface{}) {
	var out bytes.Buffer
	out.WriteString(envelopeStart)
	e := xml.NewEncoder(&out)
	start := xml.StartElement{Name: xml.Name{Local: element}, Attr: []xml.Attr{{Name: xml.Name{Local: "xmlns"}, Value: "urn:vim25"}}}
	if err := e.EncodeElement(res, start); err != nil {
		log.Printf("encode %s: %v", element, err)
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	_ = e.Flush()
	out.WriteString(envelopeEnd)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(out.Bytes())
}

func writeFault(w http.ResponseWriter, msg string, fault types.BaseMethodFault) {
	kind := typeNameOf(fault)
	if msg == "" {
		msg = kind
	}
	var out bytes.Buffer
	out.WriteString(envelopeStart)
	out.WriteString(`<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>`)
	_ = xml.EscapeText(&out, []byte(msg))
	out.WriteString(`</faultstring><detail>`)
	e := xml.NewEncoder(&out)
	start := xml.StartElement{Name: xml.Name{Local: kind + "Fault"}, Attr: []xml.Attr{
		{Name: xml.Name{Local: "xmlns"}, Value: "urn:vim25"},
		{Name: xml.Name{Local: "xsi:type"}, Value: kind},
	}}
	if err := e.EncodeElement(fault, start); err != nil {
		log.Printf("encode fault %s: %v", kind, err)
	}
	_ = e.Flush()
	out.WriteString(`</detail></soapenv:Fault>`)
	out.WriteString(envelopeEnd)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	_, _ = w.Write(out.Bytes())
}

type taskResponse struct {
	Returnval types.ManagedObjectReference `xml:"returnval"`
}

// failTask answers a *_Task method with a task that has already ended in error,
// which is how vCenter reports most operational failures (the SOAP call itself
// succeeds and returns the task).
func (a *App) failTask(w http.ResponseWriter, m *simulator.Method, fault types.BaseMethodFault, msg string) {
	if msg == "" {
		msg = typeNameOf(fault)
	}
	id := strings.TrimSuffix(m.Name, "_Task")
	id = strings.ToLower(id[:1]) + id[1:]
	task := simulator.CreateTask(m.This, id, func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, fault
	})
	fixTaskEntity(task, a.vmOf(m))
	ref := task.Run()
	simulator.Map.Update(task, []types.PropertyChange{{
		Name: "info.error",
		Val:  &types.LocalizedMethodFault{Fault: fault, LocalizedMessage: msg},
	}})
	writeResponse(w, m.Name+"Response", &taskResponse{Returnval: ref})
}

// fixTaskEntity: vCenter reports snapshot tasks against the VM (TaskInfo.entity
// is a ManagedEntity); the simulator puts the snapshot there, which pyVmomi
// cannot deserialize.
func fixTaskEntity(t *simulator.Task, vmID string) {
	e := t.Info.Entity
	if e == nil || e.Type != "VirtualMachineSnapshot" || vmID == "" {
		return
	}
	vm := types.ManagedObjectReference{Type: "VirtualMachine", Value: vmID}
	name := vm.Value
	if obj := vmObject(vm); obj != nil {
		name = obj.Name
	}
	simulator.Map.WithLock(t, func() {
		t.Info.Entity = &vm
		t.Info.EntityName = name
	})
}

func typeNameOf(v interface{}) string {
	s := fmt.Sprintf("%T", v)
	if i := strings.LastIndex(s, "."); i >= 0 {
		s = s[i+1:]
	}
	return strings.TrimPrefix(s, "*")
}

func sha256Sum(b []byte) [32]byte { return sha256.Sum256(b) }

func pemEncode(kind string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
}
