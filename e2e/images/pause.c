/* The lab's sandbox ("pause") image: PID 1 of every pod. It holds the pod's
 * namespaces, reaps orphans, and exits on SIGINT or SIGTERM. Built static so
 * the image needs no libc. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction on_quit = {.sa_handler = quit};
  struct sigaction on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGINT, &on_quit, NULL);
  sigaction(SIGTERM, &on_quit, NULL);
  sigaction(SIGCHLD, &on_child, NULL);
  for (;;) pause();
}
