// Command vcsim-transcend is the test harness's vCenter simulator: govmomi's
// simulator package (VPX model) extended with VM disks as real files in a
// datastore directory, vSphere-like snapshot disk chains, a Changed Block
// Tracking model with QueryChangedDiskAreas, and a small control API for
// tests (fault injection, CBT reset, pagination limit, disk file listing).
//
// Built in GOPATH mode from Debian's golang-github-vmware-govmomi-dev; see
// README.md next to this file for the model and where each rule comes from.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

type readiness struct {
	URL           string `json:"url"`
	Host          string `json:"host"`
	Port          int    `json:"port"`
	User          string `json:"user"`
	Password      string `json:"password"`
	Thumbprint    string `json:"thumbprint"`
	Thumbprint256 string `json:"thumbprint_sha256"`
	Datacenter    string `json:"datacenter"`
	Cluster       string `json:"cluster"`
	Datastore     string `json:"datastore"`
	DatastoreDir  string `json:"datastore_dir"`
	ControlURL    string `json:"control_url"`
	CertFile      string `json:"cert_file,omitempty"`
	Pid           int    `json:"pid"`
}

func main() {
	dsDir := flag.String("datastore-dir", "", "directory backing the datastore (required)")
	dsName := flag.String("datastore-name", "datastore1", "datastore name")
	user := flag.String("user", "administrator@vsphere.local", "login user name")
	password := flag.String("password", "", "login password (default: env VCSIM_PASSWORD)")
	listen := flag.String("listen", "127.0.0.1:0", "listen address")
	readyFile := flag.String("ready-file", "", "write the readiness JSON here (atomically) once serving")
	certFile := flag.String("cert-file", "", "also write the server certificate (PEM) here")
	pageLimit := flag.Int("page-limit", 64, "max changedArea entries per QueryChangedDiskAreas reply")
	hosts := flag.Int("cluster-hosts", 2, "hosts in the cluster")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	if *dsDir == "" {
		log.Fatal("--datastore-dir is required")
	}
	if *password == "" {
		*password = os.Getenv("VCSIM_PASSWORD")
	}
	if *password == "" {
		log.Fatal("--password (or VCSIM_PASSWORD) is required")
	}
	abs, err := filepath.Abs(*dsDir)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		log.Fatal(err)
	}

	model := simulator.VPX()
	model.Datastore = 0 // our own datastore, in the given directory
	model.Machine = 0   // no pre-created VMs: every VM is created through the API
	model.Autostart = false
	model.ClusterHost = *hosts
	model.Host = 0
	if err := model.Create(); err != nil {
		log.Fatalf("model: %v", err)
	}
	dcName, clusterName, err := addDatastore(model, *dsName, abs)
	if err != nil {
		log.Fatalf("datastore: %v", err)
	}

	cert, thumb, thumb256, certPEM, err := selfSigned()
	if err != nil {
		log.Fatalf("certificate: %v", err)
	}
	if *certFile != "" {
		if err := os.WriteFile(*certFile, certPEM, 0o644); err != nil {
			log.Fatal(err)
		}
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	addr := ln.Addr().(*net.TCPAddr)
	hostport := ln.Addr().String()

	svc := model.Service
	svc.Listen = &url.URL{Scheme: "https", Host: hostport, Path: "/sdk", User: url.UserPassword(*user, *password)}
	svc.RegisterSDK(simulator.Map)
	svc.ServeMux.HandleFunc("/sdk/vimServiceVersions.xml", svc.ServiceVersions)
	svc.ServeMux.HandleFunc("/about", svc.About)
	simulator.Map.SessionManager().ServiceHostName = hostport

	app := newApp(svc, *dsName, abs, dcName, *pageLimit)

	srv := &http.Server{
		Handler:           app,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          log.New(os.Stderr, "http: ", log.LstdFlags),
	}
	go func() {
		if err := srv.ServeTLS(ln, "", ""); err != nil && err != http.ErrServerClosed {
			log.Fatalf("serve: %v", err)
		}
	}()

	base := "https://" + hostport
	ready := readiness{
		URL: base + "/sdk", Host: addr.IP.String(), Port: addr.Port,
		User: *user, Password: *password, Thumbprint: thumb, Thumbprint256: thumb256,
		Datacenter: dcName, Cluster: clusterName, Datastore: *dsName, DatastoreDir: abs,
		ControlURL: base + "/transcend", CertFile: *certFile, Pid: os.Getpid(),
	}
	line, _ := json.Marshal(ready)
	if *readyFile != "" {
		tmp := *readyFile + ".tmp"
		if err := os.WriteFile(tmp, append(line, '\n'), 0o600); err != nil {
			log.Fatal(err)
		}
		if err := os.Rename(tmp, *readyFile); err != nil {
			log.Fatal(err)
		}
	}
	fmt.Println(string(line))
	log.Printf("vcsim-transcend serving on %s (datastore %s at %s)", base, *dsName, abs)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	s := <-sig
	log.Printf("signal %v: stopping", s)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_ = srv.Shutdown(ctx)
}

// addDatastore mounts one local datastore, backed by dir, on every host of the
// (only) datacenter, and returns the datacenter and first cluster names.
func addDatastore(model *simulator.Model, name, dir string) (string, string, error) {
	ctx := context.Background()
	c, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		return "", "", err
	}
	var dcName, clusterName string
	for _, e := range simulator.Map.All("Datacenter") {
		dcName = e.Entity().Name
	}
	for _, e := range simulator.Map.All("ClusterComputeResource") {
		clusterName = e.Entity().Name
	}
	for _, e := range simulator.Map.All("HostSystem") {
		host := object.NewHostSystem(c, e.Reference())
		dss, err := host.ConfigManager().DatastoreSystem(ctx)
		if err != nil {
			return "", "", err
		}
		if _, err := dss.CreateLocalDatastore(ctx, name, dir); err != nil {
			return "", "", fmt.Errorf("host %s: %w", e.Entity().Name, err)
		}
	}
	return dcName, clusterName, nil
}

func selfSigned() (tls.Certificate, string, string, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, "", "", nil, err
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "localhost", Organization: []string{"transcend vcsim"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, "", "", nil, err
	}
	sum := sha1.Sum(der)
	sum256 := sha256Sum(der)
	pemBytes := pemEncode("CERTIFICATE", der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, colonHex(sum[:]), colonHex(sum256[:]), pemBytes, nil
}

func colonHex(b []byte) string {
	parts := make([]string, len(b))
	for i, c := range b {
		parts[i] = fmt.Sprintf("%02X", c)
	}
	return strings.Join(parts, ":")
}

var _ = types.ManagedObjectReference{}
