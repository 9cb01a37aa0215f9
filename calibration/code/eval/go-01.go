// Package stats provides streaming statistics: count, mean and variance
// computed in a single pass with Welford's method, plus min and max.
package stats

import (
	"fmt"
	"math"
)

// Running accumulates samples without storing them.
type Running struct {
	n    int
	mean float64
	m2   float64
	min  float64
	max  float64
}

// Add records one sample.
func (r *Running) Add(x float64) {
	r.n++
	if r.n == 1 {
		r.min, r.max = x, x
	} else {
		r.min = math.Min(r.min, x)
		r.max = math.Max(r.max, x)
	}
	delta := x - r.mean
	r.mean += delta / float64(r.n)
	r.m2 += delta * (x - r.mean)
}

// Merge combines another accumulator into r (useful across goroutines).
func (r *Running) Merge(o Running) {
	if o.n == 0 {
		return
	}
	if r.n == 0 {
		*r = o
		return
	}
	n := r.n + o.n
	delta := o.mean - r.mean
	r.m2 += o.m2 + delta*delta*float64(r.n)*float64(o.n)/float64(n)
	r.mean += delta * float64(o.n) / float64(n)
	r.min = math.Min(r.min, o.min)
	r.max = math.Max(r.max, o.max)
	r.n = n
}

// Count returns the number of samples seen.
func (r *Running) Count() int { return r.n }

// Mean returns the arithmetic mean, or NaN when empty.
func (r *Running) Mean() float64 {
	if r.n == 0 {
		return math.NaN()
	}
	return r.mean
}

// Variance returns the sample variance (n-1 denominator).
func (r *Running) Variance() float64 {
	if r.n < 2 {
		return math.NaN()
	}
	return r.m2 / float64(r.n-1)
}

// StdDev returns the sample standard deviation.
func (r *Running) StdDev() float64 { return math.Sqrt(r.Variance()) }

func (r Running) String() string {
	return fmt.Sprintf("n=%d mean=%.4g sd=%.4g min=%g max=%g",
		r.n, r.Mean(), r.StdDev(), r.min, r.max)
}
