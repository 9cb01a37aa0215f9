// Command checklinks reads URLs from stdin (one per line) and checks them
// concurrently with a bounded pool of workers, printing one status line
// per URL in input order.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

type result struct {
	index  int
	url    string
	status int
	err    error
	took   time.Duration
}

func check(ctx context.Context, client *http.Client, url string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	return resp.StatusCode, nil
}

func main() {
	workers := flag.Int("workers", 8, "number of concurrent requests")
	timeout := flag.Duration("timeout", 5*time.Second, "per-request timeout")
	flag.Parse()

	var urls []string
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line != "" && !strings.HasPrefix(line, "#") {
			urls = append(urls, line)
		}
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "read error:", err)
		os.Exit(1)
	}

	client := &http.Client{Timeout: *timeout}
	jobs := make(chan int)
	results := make(chan result, len(urls))
	var wg sync.WaitGroup

	for w := 0; w < *workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				start := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), *timeout)
				code, err := check(ctx, client, urls[i])
				cancel()
				results <- result{i, urls[i], code, err, time.Since(start)}
			}
		}()
	}

	go func() {
		for i := range urls {
			jobs <- i
		}
		close(jobs)
	}()

	go func() {
		wg.Wait()
		close(results)
	}()

	// Collect everything, then print in the original order.
	ordered := make([]result, len(urls))
	failures := 0
	for r := range results {
		ordered[r.index] = r
		if r.err != nil || r.status >= 400 {
			failures++
		}
	}
	for _, r := range ordered {
		if r.err != nil {
			fmt.Printf("ERR  %-50s %v\n", r.url, r.err)
			continue
		}
		fmt.Printf("%3d  %-50s %6dms\n", r.status, r.url, r.took.Milliseconds())
	}
	if failures > 0 {
		fmt.Fprintf(os.Stderr, "%d of %d links failed\n", failures, len(urls))
		os.Exit(2)
	}
}
