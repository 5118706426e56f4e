package main

// Control API for tests (plain JSON over the same TLS port, under /transcend/;
// no vSphere session needed). See README.md for the calls.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path"
	"reflect"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type faultRule struct {
	Method  string          `json:"method"`
	VM      string          `json:"vm,omitempty"` // moref value or name; "" = any
	Count   int             `json:"count"`
	Fault   string          `json:"fault"`
	Message string          `json:"message,omitempty"`
	Fields  json.RawMessage `json:"fields,omitempty"`
	vmRef   string
}

func (a *App) faultArmed(method string) bool {
	for _, r := range a.faults {
		if r.Method == method && r.Count > 0 {
			return true
		}
	}
	return false
}

func (a *App) takeFault(method, vm string) *faultRule {
	for _, r := range a.faults {
		if r.Method == method && r.Count > 0 && (r.vmRef == "" || r.vmRef == vm) {
			r.Count--
			return r
		}
	}
	return nil
}

// makeFault builds any vim25 fault type by name, fields given as JSON with the
// Go field names (e.g. {"File": "..."}).
func makeFault(name string, fields json.RawMessage) (types.BaseMethodFault, error) {
	rt, ok := types.TypeFunc()(name)
	if !ok {
		return nil, fmt.Errorf("unknown fault type %q", name)
	}
	v := reflect.New(rt).Interface()
	if len(fields) > 0 {
		if err := json.Unmarshal(fields, v); err != nil {
			return nil, fmt.Errorf("fields: %w", err)
		}
	}
	f, ok := v.(types.BaseMethodFault)
	if !ok {
		return nil, fmt.Errorf("%q is not a fault type", name)
	}
	return f, nil
}

func (a *App) injectFault(w http.ResponseWriter, m *simulator.Method, r *faultRule) {
	f, err := makeFault(r.Fault, r.Fields)
	if err != nil {
		f = &types.SystemError{Reason: err.Error()}
	}
	msg := r.Message
	if msg == "" {
		msg = "Injected fault: " + r.Fault
		if r.Fault == "NoDiskSpace" || r.Fault == "InsufficientDiskSpace" {
			msg = noSpaceMsg
		}
	}
	if strings.HasSuffix(m.Name, "_Task") {
		a.failTask(w, m, f, msg)
	} else {
		writeFault(w, msg, f)
	}
}

func (a *App) resolveVM(s string) (types.ManagedObjectReference, bool) {
	for _, e := range simulator.Map.All("VirtualMachine") {
		if e.Reference().Value == s || e.Entity().Name == s {
			return e.Reference(), true
		}
	}
	return types.ManagedObjectReference{}, false
}

func writeJSON(w http.ResponseWriter, code int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func (a *App) serveControl(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	fail := func(code int, format string, args ...interface{}) {
		writeJSON(w, code, map[string]string{"error": fmt.Sprintf(format, args...)})
	}
	var body map[string]json.RawMessage
	if r.Method == http.MethodPost {
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			fail(http.StatusBadRequest, "body: %v", err)
			return
		}
	}
	str := func(k string) string {
		var s string
		_ = json.Unmarshal(body[k], &s)
		return s
	}
	vmArg := func() (*vmModel, bool) {
		name := r.URL.Query().Get("vm")
		if body != nil {
			name = str("vm")
		}
		ref, ok := a.resolveVM(name)
		if !ok {
			fail(http.StatusNotFound, "no VM %q", name)
			return nil, false
		}
		return a.model(ref), true
	}

	switch {
	case r.URL.Path == "/transcend/ping":
		writeJSON(w, 200, map[string]bool{"ok": true})
	case r.URL.Path == "/transcend/fault" && r.Method == http.MethodPost:
		var rule faultRule
		raw, _ := json.Marshal(body)
		if err := json.Unmarshal(raw, &rule); err != nil {
			fail(400, "%v", err)
			return
		}
		if rule.Method == "" || rule.Fault == "" {
			fail(400, "method and fault are required")
			return
		}
		if _, err := makeFault(rule.Fault, rule.Fields); err != nil {
			fail(400, "%v", err)
			return
		}
		if rule.Count == 0 {
			rule.Count = 1
		}
		if rule.VM != "" {
			ref, ok := a.resolveVM(rule.VM)
			if !ok {
				fail(404, "no VM %q", rule.VM)
				return
			}
			rule.vmRef = ref.Value
		}
		a.faults = append(a.faults, &rule)
		writeJSON(w, 200, rule)
	case r.URL.Path == "/transcend/fault" && r.Method == http.MethodDelete:
		a.faults = nil
		writeJSON(w, 200, map[string]bool{"ok": true})
	case r.URL.Path == "/transcend/fault" && r.Method == http.MethodGet:
		writeJSON(w, 200, a.faults)
	case r.URL.Path == "/transcend/page-limit" && r.Method == http.MethodPost:
		var n int
		if err := json.Unmarshal(body["limit"], &n); err != nil || n < 1 {
			fail(400, "limit must be a positive integer")
			return
		}
		a.pageLimit = n
		writeJSON(w, 200, map[string]int{"limit": n})
	case r.URL.Path == "/transcend/cbt-reset" && r.Method == http.MethodPost:
		m, ok := vmArg()
		if !ok {
			return
		}
		a.cbtReset(m)
		a.syncDevices(m)
		writeJSON(w, 200, a.listDisks(m))
	case r.URL.Path == "/transcend/disks" && r.Method == http.MethodGet:
		m, ok := vmArg()
		if !ok {
			return
		}
		writeJSON(w, 200, map[string]interface{}{
			"vm": m.ref.Value, "disks": a.listDisks(m),
			"cbtActive": m.cbtActive, "cbtPending": m.cbtPending,
		})
	case r.URL.Path == "/transcend/datastore" && r.Method == http.MethodPost:
		if raw, ok := body["freeSpace"]; ok {
			if string(raw) == "null" {
				a.freeSpace = nil
			} else {
				var n int64
				if err := json.Unmarshal(raw, &n); err != nil || n < 0 {
					fail(400, "freeSpace must be a non-negative integer or null")
					return
				}
				a.freeSpace = &n
			}
		}
		a.applyFreeSpace()
		writeJSON(w, 200, map[string]interface{}{"freeSpace": a.freeSpace})
	default:
		fail(http.StatusNotFound, "unknown control call %s %s", r.Method, r.URL.Path)
	}
}

// serveFolder serves datastore files like vCenter's /folder endpoint:
// GET/HEAD with Range, after authentication with the SOAP session cookie (or
// HTTP basic credentials). Writes are refused: the model keeps its disk
// bookkeeping itself and the product must not rely on uploads.
func (a *App) serveFolder(w http.ResponseWriter, r *http.Request) {
	authed := false
	if u, p, ok := r.BasicAuth(); ok {
		want := a.svc.Listen.User
		wp, _ := want.Password()
		authed = u == want.Username() && p == wp
	} else {
		authed = a.sessionOK(r)
	}
	if !authed {
		w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
		http.Error(w, "401 Unauthorized", http.StatusUnauthorized)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed by the transcend vcsim model", http.StatusMethodNotAllowed)
		return
	}
	q := r.URL.Query()
	if ds := q.Get("dsName"); ds != a.dsName {
		http.Error(w, "datastore not found", http.StatusNotFound)
		return
	}
	if dc := q.Get("dcPath"); dc != "" && dc != a.dcName {
		http.Error(w, "datacenter not found", http.StatusNotFound)
		return
	}
	rel := strings.TrimPrefix(strings.TrimPrefix(r.URL.Path, "/folder"), "/")
	clean := strings.TrimPrefix(path.Clean("/"+rel), "/")
	if clean == "" || strings.HasPrefix(clean, "..") {
		http.Error(w, "not found", http.StatusNotFound)
		return
	}
	f, err := os.Open(a.dsDir + "/" + clean)
	if err != nil {
		http.Error(w, "not found", http.StatusNotFound)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.IsDir() {
		http.Error(w, "not found", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, "", st.ModTime(), f)
}
