// kubecluster runs a real, single-machine Kubernetes control plane for the
// integration tests: embedded etcd, kube-apiserver and kube-controller-manager
// built from k8s.io/kubernetes (see versions.txt), and with --node one worker
// node (kube-scheduler, containerd, kubelet) on which pods really run.
//
// It is one multi-call binary:
//
//	kubecluster up --dir DIR           supervisor: etcd in-process, the others as children
//	kubecluster apiserver FLAGS...     kube-apiserver (started by "up")
//	kubecluster controller-manager ... kube-controller-manager (started by "up")
//	kubecluster scheduler FLAGS...     kube-scheduler (started by "up --node")
//	kubecluster kubelet FLAGS...       kubelet (started by "up --node")
//	kubecluster node-cleanup --dir DIR undo what a killed "up --node" left on the host
//	kubecluster kubectl ARGS...        kubectl (also when invoked through a "kubectl" symlink)
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata" // CronJob time zones, as in the upstream mains

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	if filepath.Base(os.Args[0]) == "kubectl" {
		runKubectl(os.Args[1:])
		return
	}
	if len(os.Args) < 2 {
		usage()
	}
	mode, args := os.Args[1], os.Args[2:]
	switch mode {
	case "up":
		os.Exit(up(args))
	case "apiserver":
		os.Exit(runCobra(apiserver.NewAPIServerCommand(), "kube-apiserver", args))
	case "controller-manager":
		os.Exit(runCobra(controllermanager.NewControllerManagerCommand(), "kube-controller-manager", args))
	case "scheduler":
		os.Exit(runCobra(scheduler.NewSchedulerCommand(), "kube-scheduler", args))
	case "kubelet":
		os.Exit(runCobra(kubelet.NewKubeletCommand(context.Background()), "kubelet", args))
	case "node-cleanup":
		os.Exit(nodeCleanupMain(args))
	case "kubectl":
		runKubectl(args)
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: kubecluster up --dir DIR [--port N] [--node] | apiserver | controller-manager | scheduler | kubelet FLAGS | node-cleanup --dir DIR | kubectl ARGS")
	os.Exit(2)
}

func runCobra(cmd *cobra.Command, name string, args []string) int {
	os.Args = append([]string{name}, args...)
	cmd.SetArgs(args)
	return cli.Run(cmd)
}

// runKubectl mirrors k8s.io/kubernetes/cmd/kubectl/kubectl.go.
func runKubectl(args []string) {
	os.Args = append([]string{"kubectl"}, args...)
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
	}
}
