// The CPU thread pool when the system gives fewer threads than asked (a process limit): it runs
// with the ones it got. Its constructor used to unwind past the workers it had started, and the
// process hung (a review's `kestrel run -t 300` under `ulimit -u 200`).
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>

#include "core/thread_pool.h"

namespace kestrel {
namespace {

TEST(ThreadPool, RunsWithTheThreadsTheSystemGives) {
  // The limit binds only a user without CAP_SYS_RESOURCE: the child becomes `nobody`, which
  // needs root to start with.
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run a child as another user";
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::alarm(60);  // a hang ends the child by SIGALRM, which the parent reports
    const rlimit limit{16, 16};
    if (::setrlimit(RLIMIT_NPROC, &limit) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0) {
      ::_exit(3);
    }
    int64_t sum = 0;
    int size = 0;
    {
      ThreadPool pool(64);
      size = pool.size();
      std::atomic<int64_t> total{0};
      pool.parallel_for(10000, 1, [&](int64_t begin, int64_t end, int) {
        for (int64_t i = begin; i < end; ++i) total += i;
      });
      sum = total.load();
    }
    ::_exit(sum == int64_t(10000) * 9999 / 2 && size >= 1 && size < 64 ? 0 : 4);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "child ended by signal " << WTERMSIG(status)
                                 << (WTERMSIG(status) == SIGALRM ? " (it hung)" : "");
  if (WEXITSTATUS(status) == 3) GTEST_SKIP() << "cannot become nobody with a process limit here";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "wrong sum or pool size";
}

}  // namespace
}  // namespace kestrel
