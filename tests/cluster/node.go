package main

// One worker node for the test cluster: kube-scheduler, containerd (+ runc and
// the bridge CNI plugin from the distribution) and a kubelet, supervised by
// "kubecluster up --node". Pods really run: on a bridge with its own subnet,
// reaching the API server through the "kubernetes" Service IP (a DNAT rule:
// there is no kube-proxy) and host servers through the bridge address.
//
// Everything the node changes on the host is undone by cleanupNode, which is
// idempotent and also runs before a start (for a predecessor that was killed):
// processes (containerd shims outlive containerd), mounts, cgroups, the
// bridge, iptables rules (ours and the kubelet's), the CNI caches, sysctls.
//
// Some paths are fixed by the components (containerd's shim sockets, the
// kubelet's /var/lib/kubelet/device-plugins and /var/log/containers), so one
// node-enabled cluster runs per machine; nodeRun is fixed for that reason too.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	nodeName     = "kubecluster-node"
	bridgeName   = "kubecluster0"
	podCIDR      = "10.244.0.0/16"
	nodeIP       = "10.244.0.1" // the bridge's address: the node IP and the pods' gateway to the host
	serviceIP    = "10.0.0.1"   // the "kubernetes" Service (first address of --service-cluster-ip-range)
	cgroupParent = "kubecluster"
	cniNetwork   = "kubecluster"
	nodeRun      = "/run/kubecluster"     // containerd state and sockets (short: unix socket paths are limited)
	nodeData     = "/var/lib/kubecluster" // containerd root (images), kubelet root, pod logs: on disk
	ruleComment  = "kubecluster: kubernetes Service to the API server"
	pauseImage   = "registry.k8s.io/pause:kubecluster"
	// A sysctl the bridge CNI plugin turns on without asking; restored on cleanup.
	ipForwardSysctl = "/proc/sys/net/ipv4/ip_forward"
)

// hostDirs are the fixed paths outside our directories that the node's components write to.
var hostDirs = []string{"/run/containerd", "/var/lib/cni", "/var/lib/kubelet", "/var/log/containers", "/var/log/pods"}

// nodePaths are where the node keeps its data.
type nodePaths struct {
	run  string // nodeRun: containerd state, sockets, runc state, netns mounts
	data string // under the cluster's run dir: containerd root (images), kubelet root, pod logs
	bin  string // the directory of kubecluster: containerd, containerd-shim-runc-v2, ctr, pause.tar
}

func (p nodePaths) containerdSock() string { return filepath.Join(p.run, "containerd.sock") }

// claimNode makes sure no other node-enabled cluster runs on this machine
// (the node uses fixed host paths) and records us as the owner.
func claimNode(paths nodePaths) error {
	owner := filepath.Join(paths.run, "owner.pid")
	if b, err := os.ReadFile(owner); err == nil {
		if pid, _ := strconv.Atoi(strings.TrimSpace(string(b))); pid > 0 && pid != os.Getpid() && strings.Contains(cmdline(pid), "kubecluster") {
			if st, _ := procStat(pid); st != 0 && st != 'Z' {
				return fmt.Errorf("another node-enabled kubecluster (pid %d) runs on this machine; only one can (stop it with tests/cluster/down.sh in its checkout)", pid)
			}
		}
	}
	if err := os.MkdirAll(paths.run, 0o700); err != nil {
		return err
	}
	return os.WriteFile(owner, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600)
}

// nodeCleanupMain is "kubecluster node-cleanup": for down.sh, after a kubecluster had to be killed.
func nodeCleanupMain(args []string) int {
	log.SetPrefix("kubecluster node-cleanup: ")
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
		fmt.Fprintln(os.Stderr, "usage: kubecluster node-cleanup  (undoes what a killed \"up --node\" left on this host)")
		return 2
	}
	if err := claimNode(nodePaths{run: nodeRun}); err != nil {
		log.Print(err)
		return 1
	}
	self, _ := os.Executable()
	if !cleanupNode(nodePaths{run: nodeRun, data: nodeData, bin: filepath.Dir(self)}) {
		return 1
	}
	return 0
}

// nodePreflight says, in one message, everything the node needs that is missing.
func nodePreflight(bin string) error {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root: containerd, runc and the kubelet need it (run as root, or set CLUSTER_NODE=0 for a control plane without a node)")
	}
	for _, cmd := range []string{"runc", "iptables", "ip6tables", "ip"} {
		if _, err := exec.LookPath(cmd); err != nil {
			missing = append(missing, cmd+" on PATH (Debian: apt-get install runc iptables iproute2)")
		}
	}
	if cniBinDir() == "" {
		missing = append(missing, "the CNI plugins bridge, host-local and loopback in /usr/lib/cni or /opt/cni/bin (Debian: apt-get install containernetworking-plugins)")
	}
	for _, f := range []string{"containerd", "containerd-shim-runc-v2", "ctr", "pause.tar"} {
		if _, err := os.Stat(filepath.Join(bin, f)); err != nil {
			missing = append(missing, filepath.Join(bin, f)+" (built by tests/cluster/build.sh)")
		}
	}
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err != nil {
		if _, err2 := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err2 != nil {
			missing = append(missing, "a mounted cgroup hierarchy under /sys/fs/cgroup")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("cannot start a node; missing:\n  - %s", strings.Join(missing, "\n  - "))
	}
	return nil
}

func cniBinDir() string {
	for _, d := range []string{"/usr/lib/cni", "/opt/cni/bin"} {
		ok := true
		for _, p := range []string{"bridge", "host-local", "loopback"} {
			if _, err := os.Stat(filepath.Join(d, p)); err != nil {
				ok = false
			}
		}
		if ok {
			return d
		}
	}
	return ""
}

// nodePKI are the node's certificates, issued before the API server starts
// (it needs its kubelet client certificate).
type nodePKI struct {
	kubeletClient  *keyPair // system:node:<name> in system:nodes: the Node authorizer applies
	kubeletServing *keyPair
	apiserverToKub *keyPair // the API server's client certificate for the kubelet (logs, exec, port-forward)
	scheduler      *keyPair
}

func issueNodePKI(ca *keyPair) (*nodePKI, error) {
	var n nodePKI
	var err error
	if n.kubeletClient, err = ca.issue("system:node:"+nodeName, []string{"system:nodes"}, nil, nil); err != nil {
		return nil, err
	}
	if n.kubeletServing, err = ca.issue(nodeName, nil, []string{nodeName}, []net.IP{net.ParseIP(nodeIP)}); err != nil {
		return nil, err
	}
	if n.apiserverToKub, err = ca.issue("kube-apiserver-kubelet-client", []string{"system:masters"}, nil, nil); err != nil {
		return nil, err
	}
	if n.scheduler, err = ca.issue("system:kube-scheduler", nil, nil, nil); err != nil {
		return nil, err
	}
	return &n, nil
}

// prepareHost creates the bridge, the DNAT rule to the API server and the
// cgroup parent. Called after cleanupNode.
func prepareHost(paths nodePaths, apiPort int) error {
	for _, d := range []string{paths.run, paths.data} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	// Fixed host paths of containerd (shim sockets), the CNI plugins (caches)
	// and the kubelet (device plugins, container log links): removed on
	// cleanup when we created them.
	var created []string
	for _, d := range hostDirs {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			created = append(created, d)
		}
	}
	if err := os.WriteFile(filepath.Join(paths.run, "created-host-dirs"), []byte(strings.Join(created, "\n")+"\n"), 0o600); err != nil {
		return err
	}
	// Restored by cleanupNode (which has already restored a killed predecessor's).
	if v, err := os.ReadFile(ipForwardSysctl); err != nil {
		return err
	} else if err := os.WriteFile(filepath.Join(paths.run, "ip_forward.saved"), v, 0o600); err != nil {
		return err
	}
	steps := [][]string{
		{"ip", "link", "add", bridgeName, "type", "bridge"},
		{"ip", "addr", "add", nodeIP + "/16", "dev", bridgeName},
		{"ip", "link", "set", bridgeName, "up"},
	}
	for _, s := range steps {
		if err := runQuiet(s...); err != nil {
			return err
		}
	}
	// Pods reach the API server (on 127.0.0.1) through the Service IP: DNAT to
	// loopback needs route_localnet on the bridge (gone with the bridge).
	if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+bridgeName+"/route_localnet", []byte("1"), 0o644); err != nil {
		return err
	}
	if err := runQuiet(append([]string{"iptables", "-t", "nat", "-A"}, dnatRule(apiPort)...)...); err != nil {
		return err
	}
	for _, h := range cgroupHierarchies() {
		dir := filepath.Join(h, cgroupParent)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if filepath.Base(h) == "cpuset" { // a v1 cpuset cgroup is unusable until it has cpus and mems
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				v, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					return err
				}
				if err := os.WriteFile(filepath.Join(dir, f), v, 0o644); err != nil {
					return fmt.Errorf("%s: %w", filepath.Join(dir, f), err)
				}
			}
		}
	}
	return nil
}

func dnatRule(apiPort int) []string {
	return []string{"PREROUTING", "-s", podCIDR, "-d", serviceIP + "/32", "-p", "tcp", "--dport", "443",
		"-m", "comment", "--comment", ruleComment,
		"-j", "DNAT", "--to-destination", fmt.Sprintf("127.0.0.1:%d", apiPort)}
}

// ownedHierarchies are the hierarchies our cgroups can appear in: those the
// kubelet uses and, on a hybrid host (v1 controllers, v2 mounted at
// /sys/fs/cgroup/unified), the v2 one, where runc mirrors each container's
// cgroup path. Searched for processes and cleaned at the end.
func ownedHierarchies() []string {
	out := cgroupHierarchies()
	if len(out) > 1 {
		if _, err := os.Stat("/sys/fs/cgroup/unified/cgroup.controllers"); err == nil {
			out = append(out, "/sys/fs/cgroup/unified")
		}
	}
	return out
}

// cgroupHierarchies are the cgroup v1 hierarchies (or the v2 root) the kubelet uses.
func cgroupHierarchies() []string {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return []string{"/sys/fs/cgroup"}
	}
	var out []string
	entries, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range entries {
		if e.IsDir() && e.Name() != "unified" {
			out = append(out, filepath.Join("/sys/fs/cgroup", e.Name()))
		}
	}
	return out
}

// writeNodeConfig writes containerd's config, the CNI network and the kubelet's
// kubeconfig and KubeletConfiguration; it returns the kubelet's flags.
func writeNodeConfig(paths nodePaths, pki string, server string, ca *keyPair, n *nodePKI) (containerdArgs, kubeletArgs []string, err error) {
	cniConf := filepath.Join(paths.data, "cni", "net.d")
	if err := os.MkdirAll(cniConf, 0o755); err != nil {
		return nil, nil, err
	}
	containerdConfig := fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
# Plugins that would use fixed host paths (/opt/containerd, /var/run/nri) or are not built.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs"]

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %[5]q

[plugins.'io.containerd.cri.v1.runtime']
  # Without it every sandbox fails here ("can't get final child's PID from pipe"):
  # root in this sandbox lacks CAP_SYS_RESOURCE.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = 'io.containerd.runc.v2'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      SystemdCgroup = false
      Root = %[6]q
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [%[7]q]
    conf_dir = %[8]q

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
`, filepath.Join(paths.data, "containerd"), filepath.Join(paths.run, "containerd"),
		paths.containerdSock(), paths.containerdSock()+".ttrpc", pauseImage,
		filepath.Join(paths.run, "runc"), cniBinDir(), cniConf)
	containerdToml := filepath.Join(paths.data, "containerd.toml")
	if err := os.WriteFile(containerdToml, []byte(containerdConfig), 0o600); err != nil {
		return nil, nil, err
	}
	cni := map[string]any{
		"cniVersion": "1.0.0",
		"name":       cniNetwork,
		"plugins": []any{map[string]any{
			"type": "bridge", "bridge": bridgeName, "isGateway": true, "ipMasq": false, "hairpinMode": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": podCIDR, "gateway": nodeIP}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				"dataDir": filepath.Join(paths.run, "cni-ipam"),
			},
		}},
	}
	cniJSON, _ := json.MarshalIndent(cni, "", "  ")
	if err := os.WriteFile(filepath.Join(cniConf, "10-kubecluster.conflist"), cniJSON, 0o644); err != nil {
		return nil, nil, err
	}

	kdir := filepath.Join(paths.data, "kubelet")
	if err := os.MkdirAll(kdir, 0o700); err != nil {
		return nil, nil, err
	}
	for name, data := range map[string][]byte{
		"kubelet.crt": n.kubeletServing.certPEM, "kubelet.key": n.kubeletServing.keyPEM,
	} {
		if err := os.WriteFile(filepath.Join(pki, name), data, 0o600); err != nil {
			return nil, nil, err
		}
	}
	kubeconfig := filepath.Join(paths.data, "kubelet.kubeconfig")
	if err := writeKubeconfig(kubeconfig, server, ca, n.kubeletClient, "system:node:"+nodeName); err != nil {
		return nil, nil, err
	}
	kubeletPort, err := freePort()
	if err != nil {
		return nil, nil, err
	}
	healthzPort, err := freePort()
	if err != nil {
		return nil, nil, err
	}
	kubeletConfig := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %[1]s
port: %[2]d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %[3]d
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %[4]q}
authorization:
  mode: AlwaysAllow
tlsCertFile: %[5]q
tlsPrivateKeyFile: %[6]q
containerRuntimeEndpoint: unix://%[7]s
cgroupDriver: cgroupfs
cgroupRoot: /%[8]s
failCgroupV1: false
failSwapOn: false
podLogsDir: %[9]q
clusterDomain: cluster.local
resolvConf: ""
registerNode: true
# This disk may be nearly full in CI; images are imported, never pulled: never evict or collect them.
evictionHard: {memory.available: "50Mi", nodefs.available: "1%%", nodefs.inodesFree: "1%%", imagefs.available: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
shutdownGracePeriod: 0s
`, nodeIP, kubeletPort, healthzPort, filepath.Join(pki, "ca.crt"),
		filepath.Join(pki, "kubelet.crt"), filepath.Join(pki, "kubelet.key"),
		paths.containerdSock(), cgroupParent, filepath.Join(paths.data, "pod-logs"))
	kubeletYAML := filepath.Join(paths.data, "kubelet.yaml")
	if err := os.WriteFile(kubeletYAML, []byte(kubeletConfig), 0o600); err != nil {
		return nil, nil, err
	}
	containerdArgs = []string{"--config", containerdToml}
	kubeletArgs = []string{
		"--config=" + kubeletYAML,
		"--kubeconfig=" + kubeconfig,
		"--hostname-override=" + nodeName,
		"--node-ip=" + nodeIP,
		"--root-dir=" + kdir,
		"--cert-dir=" + filepath.Join(kdir, "pki"),
		"--v=1",
	}
	return containerdArgs, kubeletArgs, nil
}

// importPause loads the pause image (a docker-archive tar made by build.sh)
// into containerd's k8s.io namespace.
func importPause(paths nodePaths) error {
	return runQuiet(filepath.Join(paths.bin, "ctr"), "--address", paths.containerdSock(), "-n", "k8s.io",
		"images", "import", "--local", filepath.Join(paths.bin, "pause.tar"))
}

// waitNodeReady polls the Node until its Ready condition is True.
func waitNodeReady(ctx context.Context, hc *http.Client, server string, deadline time.Time, children []*child) error {
	url := server + "/api/v1/nodes/" + nodeName
	last := "not registered"
	for {
		resp, err := hc.Get(url)
		if err == nil {
			var node struct {
				Status struct {
					Conditions []struct{ Type, Status, Reason, Message string }
				}
			}
			if resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&node) == nil {
				for _, c := range node.Status.Conditions {
					if c.Type == "Ready" {
						if c.Status == "True" {
							resp.Body.Close()
							return nil
						}
						last = c.Reason + ": " + c.Message
					}
				}
			}
			resp.Body.Close()
		}
		for _, c := range children {
			select {
			case <-c.done:
				return fmt.Errorf("%s exited while waiting for the node: %v (see %s.log)", c.name, c.err, c.name)
			default:
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("node %s not Ready in time; last: %s", nodeName, last)
		}
		select {
		case <-ctx.Done():
			return errors.New("interrupted")
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// waitSocket waits until a unix socket accepts connections.
func waitSocket(ctx context.Context, path string, deadline time.Time, c *child) error {
	for {
		if conn, err := net.Dial("unix", path); err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-c.done:
			return fmt.Errorf("%s exited: %v (see %s.log)", c.name, c.err, c.name)
		case <-ctx.Done():
			return errors.New("interrupted")
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not listen on %s in time", c.name, path)
		}
	}
}

// cleanupNode undoes everything a node did to the host. Idempotent; errors
// are logged and the remaining steps still run. Returns false if something
// could not be undone.
func cleanupNode(paths nodePaths) bool {
	ok := true
	fail := func(format string, args ...any) {
		ok = false
		log.Printf("node cleanup: "+format, args...)
	}
	// 1. Processes: shims (and the containers under them) of our containerd,
	// and anything still in our cgroups. Shims outlive containerd; as a child
	// subreaper we inherit them, so reap what we kill.
	for i := 0; ; i++ {
		pids := nodeProcesses(paths)
		if len(pids) == 0 {
			break
		}
		if i == 100 {
			fail("processes still alive after 10 s: %v", pids)
			break
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL) //nolint:errcheck
		}
		time.Sleep(100 * time.Millisecond)
		reapOrphans()
	}
	// 2. Mounts under our directories (netns, rootfs overlays, shm, volumes), deepest first.
	for i := 0; i < 5; i++ {
		mounts := mountsUnder(paths.run, paths.data)
		if len(mounts) == 0 {
			break
		}
		for _, m := range mounts {
			if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
				fail("unmount %s: %v", m, err)
			}
		}
	}
	// 3. Network: the bridge (its veths died with the pods' netns), our DNAT
	// rule, the kubelet's chains, the CNI plugins' caches, ip_forward.
	if _, err := net.InterfaceByName(bridgeName); err == nil {
		if err := runQuiet("ip", "link", "del", bridgeName); err != nil {
			fail("%v", err)
		}
	}
	removeIPTables()
	for _, pattern := range []string{"/var/lib/cni/results/" + cniNetwork + "-*", "/var/lib/cni/networks/" + cniNetwork} {
		matches, _ := filepath.Glob(pattern)
		for _, m := range matches {
			os.RemoveAll(m)
		}
	}
	if v, err := os.ReadFile(filepath.Join(paths.run, "ip_forward.saved")); err == nil {
		if err := os.WriteFile(ipForwardSysctl, v, 0o644); err != nil {
			fail("restoring %s: %v", ipForwardSysctl, err)
		}
	}
	// 4. The kubelet's fixed host paths: container log links into our pod logs (in a /var/log/containers
	// that existed before us), then the fixed directories we created.
	if links, err := os.ReadDir("/var/log/containers"); err == nil {
		for _, l := range links {
			p := filepath.Join("/var/log/containers", l.Name())
			if t, err := os.Readlink(p); err == nil && strings.HasPrefix(t, paths.data) {
				os.Remove(p)
			}
		}
	}
	// Host directories the components use at fixed paths and that did not exist before us.
	if created, err := os.ReadFile(filepath.Join(paths.run, "created-host-dirs")); err == nil {
		for _, d := range strings.Fields(string(created)) {
			if err := os.RemoveAll(d); err != nil {
				fail("remove %s: %v", d, err)
			}
		}
	}
	// 5. cgroups, deepest first (empty now that every process is gone).
	for _, h := range ownedHierarchies() {
		root := filepath.Join(h, cgroupParent)
		var dirs []string
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error { //nolint:errcheck
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
		for _, d := range dirs {
			if err := syscall.Rmdir(d); err != nil && !errors.Is(err, syscall.ENOENT) {
				fail("rmdir %s: %v", d, err)
			}
		}
	}
	// 6. Our directories.
	for _, d := range []string{paths.run, paths.data} {
		if err := os.RemoveAll(d); err != nil {
			fail("remove %s: %v", d, err)
		}
	}
	return ok
}

// nodeProcesses: our containerd and kubelet (left by a killed predecessor),
// the shims of our containerd, and every process in our cgroups.
func nodeProcesses(paths nodePaths) []int {
	self := os.Getpid()
	seen := map[int]bool{}
	for _, pid := range allPids() {
		if pid == self {
			continue
		}
		cmd := cmdline(pid)
		if strings.Contains(cmd, paths.containerdSock()) || strings.Contains(cmd, filepath.Join(paths.data, "containerd.toml")) ||
			strings.Contains(cmd, filepath.Join(paths.data, "kubelet.yaml")) {
			seen[pid] = true
		}
	}
	for _, h := range ownedHierarchies() {
		filepath.WalkDir(filepath.Join(h, cgroupParent), func(p string, d os.DirEntry, err error) error { //nolint:errcheck
			if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
				return nil
			}
			data, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(data)) {
				if pid, err := strconv.Atoi(f); err == nil && pid != self && !isZombie(pid) {
					seen[pid] = true
				}
			}
			return nil
		})
	}
	var out []int
	for pid := range seen {
		if !isZombie(pid) {
			out = append(out, pid)
		}
	}
	sort.Ints(out)
	return out
}

func allPids() []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

func cmdline(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return strings.ReplaceAll(string(b), "\x00", " ")
}

// procStat returns the state letter and parent pid of a process.
func procStat(pid int) (state byte, ppid int) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return 0, 0
	}
	f := strings.Fields(s[i+2:])
	if len(f) < 2 {
		return 0, 0
	}
	ppid, _ = strconv.Atoi(f[1])
	return f[0][0], ppid
}

func isZombie(pid int) bool { st, _ := procStat(pid); return st == 'Z' || st == 0 }

// tracked are the pids of our own children (reaped by exec.Cmd.Wait); reapOrphans leaves them alone.
var (
	trackedMu sync.Mutex
	tracked   = map[int]bool{}
)

func track(pid int) {
	trackedMu.Lock()
	tracked[pid] = true
	trackedMu.Unlock()
}

// reapOrphans reaps zombie children we inherited as a subreaper (shims,
// container processes), never those that exec.Cmd waits for.
func reapOrphans() {
	self := os.Getpid()
	for _, pid := range allPids() {
		trackedMu.Lock()
		ours := tracked[pid]
		trackedMu.Unlock()
		if st, ppid := procStat(pid); ppid == self && st == 'Z' && !ours {
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, syscall.WNOHANG, nil) //nolint:errcheck
		}
	}
}

// setSubreaper makes orphaned descendants (containerd shims) our children.
func setSubreaper() error {
	const prSetChildSubreaper = 36
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
		return errno
	}
	return nil
}

// mountsUnder lists mount points under any of the prefixes, deepest first.
func mountsUnder(prefixes ...string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		for _, p := range prefixes {
			if mp == p || strings.HasPrefix(mp, p+"/") {
				out = append(out, mp)
				break
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return strings.Count(out[i], "/") > strings.Count(out[j], "/") })
	return out
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// removeIPTables deletes our DNAT rule and the chains and jumps the kubelet creates.
func removeIPTables() {
	// Our rule, whatever the API server port was.
	if out, err := exec.Command("iptables", "-t", "nat", "-S", "PREROUTING").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "-A PREROUTING") && strings.Contains(line, ruleComment) {
				args := append([]string{"-t", "nat"}, splitRule(strings.Replace(line, "-A", "-D", 1))...)
				exec.Command("iptables", args...).Run() //nolint:errcheck
			}
		}
	}
	for _, ipt := range []string{"iptables", "ip6tables"} {
		exec.Command(ipt, "-t", "filter", "-D", "INPUT", "-j", "KUBE-FIREWALL").Run()  //nolint:errcheck
		exec.Command(ipt, "-t", "filter", "-D", "OUTPUT", "-j", "KUBE-FIREWALL").Run() //nolint:errcheck
		for _, tc := range [][2]string{{"filter", "KUBE-FIREWALL"}, {"mangle", "KUBE-IPTABLES-HINT"},
			{"mangle", "KUBE-KUBELET-CANARY"}, {"nat", "KUBE-KUBELET-CANARY"}, {"filter", "KUBE-KUBELET-CANARY"}} {
			exec.Command(ipt, "-t", tc[0], "-F", tc[1]).Run() //nolint:errcheck
			exec.Command(ipt, "-t", tc[0], "-X", tc[1]).Run() //nolint:errcheck
		}
	}
}

// splitRule splits an iptables -S line, keeping a quoted comment as one argument.
func splitRule(line string) []string {
	var out []string
	var cur strings.Builder
	quoted := false
	for _, r := range line {
		switch {
		case r == '"':
			quoted = !quoted
		case r == ' ' && !quoted:
			if cur.Len() > 0 {
				out = append(out, cur.String())
				cur.Reset()
			}
		default:
			cur.WriteRune(r)
		}
	}
	if cur.Len() > 0 {
		out = append(out, cur.String())
	}
	return out
}

func runQuiet(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
