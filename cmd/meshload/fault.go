package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/claudemesh/meshbroker/internal/faultload"
)

// Fault mode (--fault kill|term): meshload starts the broker binary
// (--broker-bin) itself as a child process on --data-dir or
// --database-url and a free loopback port, runs --peers pipelined senders
// (--window sends in flight each) and --peers non-acking receivers that
// answer pings, paced at --rate sends/s in total, signals the broker
// (SIGKILL or SIGTERM) after --fault-after, restarts it on the same
// database and waits until every acked message was delivered and no row
// is left undelivered. It then reports, counted by message id: acked,
// lost (acked, never delivered), duplicates (pushes beyond the first) and
// committed-but-unacked rows. The run fails if anything acked was lost.
func runFault(ctx context.Context, o options, stdout io.Writer, logf func(string, ...any)) error {
	var sig syscall.Signal
	switch o.fault {
	case "kill":
		sig = syscall.SIGKILL
	case "term":
		sig = syscall.SIGTERM
	default:
		return fmt.Errorf("--fault must be kill or term")
	}
	if o.brokerBin == "" {
		return fmt.Errorf("--fault needs --broker-bin, the meshbroker binary to run")
	}
	rate := o.rate
	if rate <= 0 {
		rate = 5000
	}
	window := o.window
	if window <= 0 {
		window = 8
	}
	db, err := faultload.OpenDB(ctx, o.databaseURL, o.dataDir)
	if err != nil {
		return err
	}
	defer db.Close()
	mesh, err := faultload.Seed(ctx, db, o.peers, o.peers)
	if err != nil {
		return err
	}
	port, err := faultload.FreePort()
	if err != nil {
		return err
	}
	env := []string{
		"SEND_RATE_LIMIT_PER_MIN=0", fmt.Sprint("MAX_CONNECTIONS_PER_MESH=", 2*o.peers+10),
		fmt.Sprint("CLAIM_LEASE_MS=", o.claimLease.Milliseconds()), "CLAIM_REAP_INTERVAL_MS=200", "LOG_LEVEL=warn",
	}
	if o.databaseURL != "" {
		env = append(env, "DATABASE_URL="+o.databaseURL)
	} else {
		env = append(env, "DATA_DIR="+o.dataDir)
	}
	env = append(env, strings.Fields(o.brokerEnv)...)
	start := func() (*faultload.Broker, error) {
		sctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		return faultload.StartBroker(sctx, o.brokerBin, port, env, os.Stderr)
	}
	b, err := start()
	if err != nil {
		return err
	}
	defer func() { b.Kill() }()
	load := faultload.NewLoad(b.URL(), mesh, rate/float64(o.peers), window)
	rctx, stopReceivers := context.WithCancel(ctx)
	defer func() { stopReceivers(); load.WaitReceivers() }()
	load.StartReceivers(rctx)
	for load.Connected() < o.peers {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	sctx, stopSenders := context.WithCancel(ctx)
	defer stopSenders()
	logf("fault run: %d senders, %d receivers, %.0f msg/s, %s after %s", o.peers, o.peers, rate, strings.ToUpper(o.fault), o.faultAfter)
	began := time.Now()
	if err := load.StartSenders(sctx); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(o.faultAfter):
	}
	ackedAtFault := load.Acked()
	elapsed := time.Since(began)
	if err := b.Signal(sig); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	exitErr := b.Wait(wctx)
	cancel()
	logf("broker stopped (%v) with %d acked (%.0f msg/s); restarting", exitErr, ackedAtFault, float64(ackedAtFault)/elapsed.Seconds())
	load.WaitSenders()
	if b, err = start(); err != nil {
		return err
	}
	settleCtx, cancel := context.WithTimeout(ctx, o.drain)
	settleErr := load.Settle(settleCtx, db)
	cancel()
	committed, err := faultload.Committed(ctx, db, mesh.ID)
	if err != nil {
		return err
	}
	r := load.Report(committed)
	if o.json {
		out := struct {
			Fault       string  `json:"fault"`
			Rate        float64 `json:"rateAchieved"`
			ExitError   string  `json:"exitError,omitempty"`
			DuplicatePc float64 `json:"duplicatePercent"`
			faultload.Report
		}{o.fault, float64(ackedAtFault) / elapsed.Seconds(), errString(exitErr), r.DuplicatePercent(), r}
		enc := json.NewEncoder(stdout)
		if err := enc.Encode(out); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "fault %s at %.0f msg/s achieved (broker exit: %v)\n%s\n", o.fault, float64(ackedAtFault)/elapsed.Seconds(), exitErr, r)
	}
	if settleErr != nil {
		return settleErr
	}
	if r.Lost > 0 {
		return fmt.Errorf("%d acked messages lost", r.Lost)
	}
	return nil
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
