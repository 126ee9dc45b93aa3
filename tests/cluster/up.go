package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

const (
	operatorNamespace = "connection-operator"
	operatorSA        = "connection-operator"
)

// child is a control-plane component running as a separate process.
type child struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has been reaped
	err  error
}

func up(args []string) int {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	dir := fs.String("dir", "kubecluster-state", "state directory (kubeconfigs, logs, pid file)")
	port := fs.Int("port", 0, "kube-apiserver port on 127.0.0.1 (0: pick a free one)")
	timeout := fs.Duration("timeout", 180*time.Second, "how long to wait for the control plane to be ready")
	node := fs.Bool("node", false, "also run a worker node (kube-scheduler, containerd, kubelet); needs root")
	fs.Parse(args) //nolint:errcheck // ExitOnError

	log.SetPrefix("kubecluster: ")
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	if err := run(*dir, *port, *timeout, *node); err != nil {
		log.Printf("error: %v", err)
		return 1
	}
	return 0
}

func run(dir string, port int, timeout time.Duration, node bool) (err error) {
	state, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(state, 0o755); err != nil {
		return err
	}
	readyFile := filepath.Join(state, "ready")
	pidFile := filepath.Join(state, "kubecluster.pid")
	os.Remove(readyFile)
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return err
	}
	defer os.Remove(pidFile)
	defer os.Remove(readyFile)
	nodeEnvFile := filepath.Join(state, "node.env")
	os.Remove(nodeEnvFile)

	self, err := os.Executable()
	if err != nil {
		return err
	}
	paths := nodePaths{run: nodeRun, data: nodeData, bin: filepath.Dir(self)}
	if node {
		if err := nodePreflight(paths.bin); err != nil {
			return err
		}
		if err := claimNode(paths); err != nil {
			return err
		}
		// Shims outlive containerd: as a subreaper we inherit them (and reap them).
		if err := setSubreaper(); err != nil {
			return fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", err)
		}
		// Runs after the children are stopped (defers run last-in, first-out).
		defer func() {
			os.Remove(nodeEnvFile)
			if cleanupNode(paths) {
				log.Printf("node cleaned up: no process, mount, cgroup, bridge or iptables rule left")
			}
		}()
		if !cleanupNode(paths) { // what a killed predecessor left
			return errors.New("could not clean up what a previous node left behind (see above)")
		}
		if err := claimNode(paths); err != nil { // the cleanup removed our claim with the rest
			return err
		}
	}

	// Stop on SIGTERM/SIGINT, also while starting.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer stop()

	// Runtime data (etcd, PKI) lives in DIR/run-*, removed on exit; one left by a
	// killed predecessor (one cluster per state dir) is removed here.
	stale, _ := filepath.Glob(filepath.Join(state, "run-*"))
	for _, d := range stale {
		os.RemoveAll(d)
	}
	work, err := os.MkdirTemp(state, "run-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	pki := filepath.Join(work, "pki")
	if err := os.Mkdir(pki, 0o700); err != nil {
		return err
	}

	if port == 0 {
		if port, err = freePort(); err != nil {
			return err
		}
	}
	etcdClientPort, err := freePort()
	if err != nil {
		return err
	}
	etcdPeerPort, err := freePort()
	if err != nil {
		return err
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", port)

	// --- PKI: one CA signs serving and client certificates.
	ca, err := newCA("kubecluster-ca")
	if err != nil {
		return err
	}
	serving, err := ca.issue("kube-apiserver", nil,
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), net.ParseIP("10.0.0.1")})
	if err != nil {
		return err
	}
	admin, err := ca.issue("kubecluster-admin", []string{"system:masters"}, nil, nil)
	if err != nil {
		return err
	}
	kcm, err := ca.issue("system:kube-controller-manager", nil, nil, nil)
	if err != nil {
		return err
	}
	operator, err := ca.issue("system:serviceaccount:"+operatorNamespace+":"+operatorSA,
		[]string{"system:serviceaccounts", "system:serviceaccounts:" + operatorNamespace}, nil, nil)
	if err != nil {
		return err
	}
	var npki *nodePKI
	if node {
		if npki, err = issueNodePKI(ca); err != nil {
			return err
		}
	}
	_, saKeyPEM, err := newKey()
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"ca.crt": ca.certPEM, "ca.key": ca.keyPEM,
		"apiserver.crt": serving.certPEM, "apiserver.key": serving.keyPEM,
		"sa.key": saKeyPEM,
	}
	if node {
		files["apiserver-kubelet-client.crt"] = npki.apiserverToKub.certPEM
		files["apiserver-kubelet-client.key"] = npki.apiserverToKub.keyPEM
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(pki, name), data, 0o600); err != nil {
			return err
		}
	}
	p := func(name string) string { return filepath.Join(pki, name) }
	kcmKubeconfig := filepath.Join(work, "controller-manager.kubeconfig")
	if err := writeKubeconfig(kcmKubeconfig, server, ca, kcm, "kube-controller-manager"); err != nil {
		return err
	}

	// --- etcd, embedded.
	cfg := embed.NewConfig()
	cfg.Name = "kubecluster"
	cfg.Dir = filepath.Join(work, "etcd")
	clientURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", etcdClientPort)}
	peerURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", etcdPeerPort)}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{clientURL}, []url.URL{clientURL}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peerURL}, []url.URL{peerURL}
	cfg.InitialCluster = cfg.Name + "=" + peerURL.String()
	cfg.Logger = "zap"
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{filepath.Join(state, "etcd.log")}
	cfg.UnsafeNoFsync = true // throwaway test data: no fsync, much faster on a busy disk
	os.Remove(filepath.Join(state, "etcd.log"))
	etcd, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	defer func() {
		etcd.Close()
		log.Printf("etcd stopped")
	}()
	select {
	case <-etcd.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		return errors.New("etcd did not become ready within 60s (see etcd.log)")
	case <-ctx.Done():
		return errors.New("interrupted")
	}
	log.Printf("etcd ready on %s", clientURL.String())

	// --- kube-apiserver and kube-controller-manager, as child processes.
	var children []*child
	defer func() {
		// Stop in reverse order: controller-manager first, then apiserver.
		for i := len(children) - 1; i >= 0; i-- {
			children[i].stop(20 * time.Second)
		}
	}()
	apiserverArgs := []string{
		"--etcd-servers=" + clientURL.String(),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--endpoint-reconciler-type=none", // a loopback address can't be an Endpoint
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + p("apiserver.crt"),
		"--tls-private-key-file=" + p("apiserver.key"),
		"--client-ca-file=" + p("ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p("sa.key"),
		"--service-account-signing-key-file=" + p("sa.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--authorization-mode=Node,RBAC",
		"--cert-dir=" + filepath.Join(work, "apiserver-certs"),
		// CLUSTER_PROFILING=1 serves /debug/pprof (e.g. to see where a benchmark spends the API
		// server's CPU: kubectl get --raw '/debug/pprof/profile?seconds=20').
		"--profiling=" + strconv.FormatBool(os.Getenv("CLUSTER_PROFILING") == "1"),
	}
	if node {
		apiserverArgs = append(apiserverArgs,
			"--kubelet-client-certificate="+p("apiserver-kubelet-client.crt"),
			"--kubelet-client-key="+p("apiserver-kubelet-client.key"),
			"--kubelet-certificate-authority="+p("ca.crt"),
			"--kubelet-preferred-address-types=InternalIP",
		)
	}
	a, err := startChild(ctx, "apiserver", state, self, apiserverArgs)
	if err != nil {
		return err
	}
	children = append(children, a)
	kcmArgs := []string{
		"--kubeconfig=" + kcmKubeconfig,
		"--authentication-kubeconfig=" + kcmKubeconfig,
		"--authorization-kubeconfig=" + kcmKubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port=0", // no serving endpoint needed
		"--controllers=*",
		"--use-service-account-credentials=true",
		"--service-account-private-key-file=" + p("sa.key"),
		"--root-ca-file=" + p("ca.crt"),
		"--cluster-signing-cert-file=" + p("ca.crt"),
		"--cluster-signing-key-file=" + p("ca.key"),
		"--leader-elect=false",
		"--profiling=false",
	}
	c, err := startChild(ctx, "controller-manager", state, self, kcmArgs)
	if err != nil {
		return err
	}
	children = append(children, c)

	// --- kubeconfigs for the tests.
	adminKubeconfig := filepath.Join(state, "kubeconfig")
	if err := writeKubeconfig(adminKubeconfig, server, ca, admin, "admin"); err != nil {
		return err
	}
	if err := writeKubeconfig(filepath.Join(state, "operator.kubeconfig"), server, ca, operator, operatorSA); err != nil {
		return err
	}

	// --- readiness: /readyz, then the default ServiceAccount (objects can be created).
	hc, err := httpClient(ca, admin)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for _, path := range []string{"/readyz", "/api/v1/namespaces/default/serviceaccounts/default"} {
		if err := waitOK(ctx, hc, server+path, deadline, children); err != nil {
			return err
		}
		log.Printf("%s ok", path)
	}

	if node {
		start := time.Now()
		schedKubeconfig := filepath.Join(work, "scheduler.kubeconfig")
		if err := writeKubeconfig(schedKubeconfig, server, ca, npki.scheduler, "kube-scheduler"); err != nil {
			return err
		}
		s, err := startChild(ctx, "scheduler", state, self, []string{
			"--kubeconfig=" + schedKubeconfig,
			"--authentication-kubeconfig=" + schedKubeconfig,
			"--authorization-kubeconfig=" + schedKubeconfig,
			"--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false", "--profiling=false",
		})
		if err != nil {
			return err
		}
		children = append(children, s)
		if err := prepareHost(paths, port); err != nil {
			return fmt.Errorf("preparing the host for the node: %w", err)
		}
		containerdArgs, kubeletArgs, err := writeNodeConfig(paths, pki, server, ca, npki)
		if err != nil {
			return err
		}
		cd, err := startChild(ctx, "containerd", state, filepath.Join(paths.bin, "containerd"), containerdArgs)
		if err != nil {
			return err
		}
		children = append(children, cd)
		if err := waitSocket(ctx, paths.containerdSock(), deadline, cd); err != nil {
			return err
		}
		if err := importPause(paths); err != nil {
			return err
		}
		k, err := startChild(ctx, "kubelet", state, self, kubeletArgs)
		if err != nil {
			return err
		}
		children = append(children, k)
		if err := waitNodeReady(ctx, hc, server, deadline, children); err != nil {
			return err
		}
		log.Printf("node %s Ready in %.1fs", nodeName, time.Since(start).Seconds())
		env := fmt.Sprintf("export CONTAINERD_ADDRESS=%s\nexport CONTAINERD_NAMESPACE=k8s.io\nexport CLUSTER_NODE_IP=%s\n",
			paths.containerdSock(), nodeIP)
		if err := os.WriteFile(nodeEnvFile, []byte(env), 0o644); err != nil {
			return err
		}
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-time.After(5 * time.Second):
					reapOrphans()
				}
			}
		}()
	}

	fmt.Printf("export KUBECONFIG=%s\n", adminKubeconfig)
	fmt.Printf("export PATH=%s:$PATH\n", paths.bin)
	if err := os.WriteFile(readyFile, []byte(server+"\n"), 0o644); err != nil {
		return err
	}
	log.Printf("cluster ready at %s (pid %d)", server, os.Getpid())

	// --- run until signalled or a component dies.
	select {
	case <-ctx.Done():
		log.Printf("signal received, stopping")
		return nil
	case ch := <-anyDone(children):
		return fmt.Errorf("%s exited unexpectedly: %v (see %s.log)", ch.name, ch.err, ch.name)
	}
}

// startChild starts NAME: "kubecluster NAME ARGS" when exe is kubecluster
// itself, else "exe ARGS". Its PATH starts with exe's directory (containerd
// finds its shim there).
func startChild(ctx context.Context, name, state, exe string, args []string) (*child, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(state, name+".log"))
	if err != nil {
		return nil, err
	}
	if exe == self {
		args = append([]string{name}, args...)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(exe)+":"+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Pdeathsig: the child is killed if this process dies, even by SIGKILL.
	// Setpgid: a terminal's Ctrl-C reaches only us; we stop the children in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, done: make(chan struct{})}
	track(cmd.Process.Pid)
	// NAME.pid lets down.sh check that nothing is left behind.
	pidFile := filepath.Join(state, name+".pid")
	os.WriteFile(pidFile, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644) //nolint:errcheck
	go func() {
		c.err = cmd.Wait()
		os.Remove(pidFile)
		logFile.Close()
		close(c.done)
	}()
	log.Printf("%s started (pid %d), log in %s.log", name, cmd.Process.Pid, name)
	return c, nil
}

// stop sends SIGTERM, waits up to grace, then SIGKILLs; always reaps.
func (c *child) stop(grace time.Duration) {
	select {
	case <-c.done:
		return
	default:
	}
	c.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck
	select {
	case <-c.done:
	case <-time.After(grace):
		log.Printf("%s did not stop within %s, killing it", c.name, grace)
		c.cmd.Process.Kill() //nolint:errcheck
		<-c.done
	}
	log.Printf("%s stopped", c.name)
}

func anyDone(children []*child) <-chan *child {
	ch := make(chan *child, len(children))
	for _, c := range children {
		go func() { <-c.done; ch <- c }()
	}
	return ch
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func httpClient(ca, user *keyPair) (*http.Client, error) {
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	cert, err := tls.X509KeyPair(user.certPEM, user.keyPEM)
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
		}},
	}, nil
}

// waitOK polls url until it answers 200, failing early if a component exits.
func waitOK(ctx context.Context, hc *http.Client, url string, deadline time.Time, children []*child) error {
	last := "no answer"
	for {
		resp, err := hc.Get(url)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, body)
		} else {
			last = err.Error()
		}
		for _, c := range children {
			select {
			case <-c.done:
				return fmt.Errorf("%s exited while waiting for %s: %v (see %s.log)", c.name, url, c.err, c.name)
			default:
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out waiting for %s; last answer: %s", url, last)
		}
		select {
		case <-ctx.Done():
			return errors.New("interrupted")
		case <-time.After(500 * time.Millisecond):
		}
	}
}
