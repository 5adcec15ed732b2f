package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/rbee-dev/rbee/bench/internal/loopback"
)

// benchSupervisord measures supervisord starting and stopping the program the hive figures use,
// over its XML-RPC interface on loopback, with the same waits as the hive figures: start returns
// once supervisord has started the process (startsecs=0), stop once it has exited after SIGTERM.
func benchSupervisord(dir, program string, n int) error {
	addr := loopback.FreeAddr()
	conf := filepath.Join(dir, "supervisord.conf")
	err := os.WriteFile(conf, []byte(fmt.Sprintf(`[supervisord]
nodaemon=true
logfile=%[1]s/supervisord.log
pidfile=%[1]s/supervisord.pid
childlogdir=%[1]s
[inet_http_server]
port=%[2]s
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[program:w]
command=%[3]s
autostart=false
autorestart=false
startsecs=0
stopsignal=TERM
stopwaitsecs=1
stdout_logfile=%[1]s/w.log
redirect_stderr=true
`, dir, addr, program)), 0o644)
	if err != nil {
		return err
	}
	sd, err := loopback.Start("supervisord", "-c", conf)
	if err != nil {
		return err
	}
	defer loopback.Stop(sd)
	url := "http://" + addr + "/RPC2"
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := xmlrpc(url, "supervisor.getState"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("supervisord did not answer on %s", addr)
		}
		time.Sleep(10 * time.Millisecond) // start-up of the baseline, outside the measurements
	}
	var start, stop []time.Duration
	for i := 0; i < n; i++ {
		idle()
		t0 := time.Now()
		if _, err := xmlrpc(url, "supervisor.startProcess", "w", "1"); err != nil {
			return err
		}
		start = append(start, time.Since(t0))
		info, err := xmlrpc(url, "supervisor.getProcessInfo", "w")
		if err != nil {
			return err
		}
		m := regexp.MustCompile(`<name>pid</name>\s*<value><int>(\d+)</int>`).FindStringSubmatch(info)
		if m == nil {
			return fmt.Errorf("no pid in %q", info)
		}
		pid, _ := strconv.Atoi(m[1])
		if err := awaitUp(int32(pid), 0); err != nil {
			return err
		}
		idle()
		t0 = time.Now()
		if _, err := xmlrpc(url, "supervisor.stopProcess", "w", "1"); err != nil {
			return err
		}
		stop = append(stop, time.Since(t0))
	}
	out, _ := exec.Command("supervisord", "--version").Output()
	fmt.Printf("supervisord %s over XML-RPC on loopback, %d cycles, the same program, pause %v\n", bytes.TrimSpace(out), n, pause)
	report("startProcess (call in, RUNNING out)", start)
	report("stopProcess (exits at once on SIGTERM)", stop)
	return nil
}

// xmlrpc calls method with string (or, for "1", boolean true) parameters and returns the
// response body; a fault is an error.
func xmlrpc(url, method string, params ...string) (string, error) {
	var b bytes.Buffer
	b.WriteString(`<?xml version="1.0"?><methodCall><methodName>` + method + `</methodName><params>`)
	for _, p := range params {
		if p == "1" {
			b.WriteString(`<param><value><boolean>1</boolean></value></param>`)
		} else {
			b.WriteString(`<param><value><string>` + p + `</string></value></param>`)
		}
	}
	b.WriteString(`</params></methodCall>`)
	resp, err := http.Post(url, "text/xml", &b)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 200 || bytes.Contains(body, []byte("<fault>")) {
		return "", fmt.Errorf("%s: %s %s", method, resp.Status, body)
	}
	return string(body), nil
}
