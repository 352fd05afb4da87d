/* A pool of worker threads that share a job: each works through its own stretch of chunks and
 * then takes chunks from the ends of the others' stretches.
 *
 * pool_run(task, args, chunks, threads) runs task(args, i) once for every chunk i in [0, chunks)
 * on up to `threads` threads (the caller's own and threads - 1 workers, started on first use and
 * kept), and returns when every chunk is done. The chunks are split into one contiguous stretch
 * per thread (the caller's first): a thread claims the chunks of its own stretch front to back,
 * so that each thread reads one long linear stream of weights (the hardware prefetchers follow
 * it; chunks dealt out alternately made each thread skip ahead every chunk). A thread whose
 * stretch is empty takes chunks from the back of another's, one at a time, until none is left.
 * Nobody holds a share it has not started: a worker that lost its core (the machine is shared)
 * delays the job only by the chunk it is running, never by the rest of its stretch, which the
 * others take; the caller waits for chunks, not for threads, and a worker that wakes after the
 * job is done finds nothing to take. (A barrier, as in an OpenMP parallel region, waits for every
 * thread to arrive; measured on this 2-core machine with one core kept busy by another process,
 * that turns every product into a wait for a time slice.)
 *
 * Between jobs a worker spins for SPIN_NS (a decode step calls the kernels every few
 * microseconds; waking a sleeping thread costs tens), then sleeps on a condition variable. The
 * caller, once no chunk is left to take, waits for the chunks still running: pause instructions
 * for YIELD_AFTER_NS, then sched_yield, which hands its core to a worker that is waiting for one.
 *
 * Each stretch is one atomic word packing its front and back chunk indices, so a claim from
 * either end is one compare-and-swap that fails once the stretch is empty; the job's task and
 * arguments are read only after a successful claim, when they cannot change (the caller does not
 * publish the next job before every chunk of this one is done, and every stretch is then empty).
 * One job runs at a time: a second caller (two Python threads) finds the pool busy and runs its
 * whole job on its own thread. A forked child starts with no workers and makes its own.
 */
#ifndef ATTNKIT_GGUF_POOL_H
#define ATTNKIT_GGUF_POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define POOL_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define POOL_PAUSE() __asm__ __volatile__("yield")
#else
#define POOL_PAUSE() ((void)0)
#endif

enum {
    POOL_MAX_THREADS = 64,
    POOL_CHUNK_BITS = 31, /* chunks per job below 2^31 (a stretch packs two indices in 64 bits) */
};
#define SPIN_NS 200000          /* a worker's spin before it sleeps: 0.2 ms covers a decode step's gaps */
#define YIELD_AFTER_NS 20000    /* the caller's spin before it yields its core to a waiting worker */

typedef void (*pool_task)(const void *args, int64_t chunk);

static struct {
    pthread_mutex_t busy;           /* held by the caller of the job in flight */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    _Atomic int stretches;          /* threads of the current job: stretches [0, stretches) */
    _Atomic int64_t done;           /* chunks of the current job finished */
    _Atomic uint32_t generation;    /* bumped for each job: what sleeping workers wait for */
    _Atomic int sleepers;
    pool_task task;
    const void *args;
    _Atomic int helpers;            /* workers the current job may use: those numbered below it */
    int workers;                    /* started so far */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* Thread t's stretch of the current job: (back << 32) | front, chunks [front, back) left; one
 * cache line each, so that a thread's claims from its own stretch do not contend with the others'. */
static struct {
    _Alignas(64) _Atomic uint64_t ends;
} pool_stretch[POOL_MAX_THREADS];

static inline int64_t pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Claim one chunk of stretch t: its front (own) or its back (another's); -1 when it is empty. */
static inline int64_t pool_claim(int t, int own) {
    _Atomic uint64_t *ends = &pool_stretch[t].ends;
    uint64_t seen = atomic_load(ends);
    for (;;) {
        const uint64_t front = seen & 0xffffffffu, back = seen >> 32;
        if (front >= back) return -1;
        const uint64_t next = own ? seen + 1 : seen - ((uint64_t)1 << 32);
        if (atomic_compare_exchange_weak(ends, &seen, next)) return (int64_t)(own ? front : back - 1);
    }
}

/* Run the chunks of stretch `me`, then those left in the others', until none is left. */
static void pool_work(int me) {
    int64_t chunk;
    while ((chunk = pool_claim(me, 1)) >= 0) {
        pool.task(pool.args, chunk);
        atomic_fetch_add(&pool.done, 1);
    }
    const int stretches = atomic_load(&pool.stretches);
    for (int i = 1; i < stretches; i++) {
        const int t = (me + i) % stretches;
        while ((chunk = pool_claim(t, 0)) >= 0) {
            pool.task(pool.args, chunk);
            atomic_fetch_add(&pool.done, 1);
        }
    }
}

static void *pool_worker(void *number) {
    const int me = (int)(intptr_t)number;
    uint32_t seen = atomic_load(&pool.generation);
    for (;;) {
        int64_t start = pool_now_ns();
        for (int spins = 0; atomic_load(&pool.generation) == seen; spins++) {
            POOL_PAUSE();
            if ((spins & 255) == 255 && pool_now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&pool.sleep_lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.sleep_lock);
            }
        }
        seen = atomic_load(&pool.generation);
        if (me < atomic_load(&pool.helpers)) pool_work(me + 1); /* a job of fewer threads than workers */
    }
    return NULL;
}

static void pool_forked_child(void) {
    /* Only the forking thread exists in the child: no workers, and no job in flight. */
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    atomic_store(&pool.sleepers, 0);
    for (int t = 0; t < POOL_MAX_THREADS; t++) atomic_store(&pool_stretch[t].ends, 0); /* a job in flight is not the child's */
    pool.workers = 0;
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_register_fork(void) { pthread_atfork(NULL, NULL, pool_forked_child); }

/* Run task(args, i) for i in [0, chunks) on up to `threads` threads; see the top of the file. */
static void pool_run(pool_task task, const void *args, int64_t chunks, int threads) {
    if (threads > POOL_MAX_THREADS) threads = POOL_MAX_THREADS;
    if (chunks < threads) threads = (int)chunks;
    if (threads <= 1 || chunks >= ((int64_t)1 << POOL_CHUNK_BITS) || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int64_t i = 0; i < chunks; i++) task(args, i);
        return;
    }
    pthread_once(&pool_once, pool_register_fork);
    while (pool.workers < threads - 1) {
        pthread_t id;
        if (pthread_create(&id, NULL, pool_worker, (void *)(intptr_t)pool.workers) != 0)
            break; /* fewer workers: still correct */
        pthread_detach(id);
        pool.workers++;
    }
    pool.task = task;
    pool.args = args;
    atomic_store(&pool.helpers, threads - 1);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.stretches, threads);
    for (int t = 0; t < threads; t++) /* thread t: chunks [chunks t / threads, chunks (t + 1) / threads) */
        atomic_store(&pool_stretch[t].ends, (uint64_t)(chunks * (t + 1) / threads) << 32 | (uint64_t)(chunks * t / threads));
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    pool_work(0);
    int64_t start = pool_now_ns();
    for (int spins = 0; atomic_load(&pool.done) < chunks; spins++) {
        if ((spins & 63) == 63 && pool_now_ns() - start > YIELD_AFTER_NS)
            sched_yield();
        else
            POOL_PAUSE();
    }
    pthread_mutex_unlock(&pool.busy);
}

#endif
