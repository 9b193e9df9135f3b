# cython: language_level=3
"""System declarations for the relay engine (Linux only).

Only what the engine calls, declared ``nogil`` so the engine's loop can run without the GIL.
``_GNU_SOURCE`` (for ``splice``, ``pipe2`` and ``F_SETPIPE_SZ``) is already defined by
``pyconfig.h``, which Cython includes first.
"""

from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR
        EMFILE
        ENFILE
        ENOMEM
        ECANCELED
        EBADF
        ETIMEDOUT
        EINPROGRESS
        ECONNREFUSED
        ECONNABORTED
        ENOBUFS
        EPROTO
        EPERM


cdef extern from "<unistd.h>" nogil:
    ctypedef long ssize_t
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int pipe2(int pipefd[2], int flags)


cdef extern from "<fcntl.h>" nogil:
    enum:
        O_NONBLOCK
        O_CLOEXEC
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        F_GETFD
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        SPLICE_F_MORE
    int fcntl(int fd, int cmd, ...)
    ssize_t splice(int fd_in, int64_t *off_in, int fd_out, int64_t *off_out,
                   size_t len, unsigned int flags)


cdef extern from "<sys/ioctl.h>" nogil:
    enum:
        FIONBIO
        FIONREAD
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct linger:
        int l_onoff
        int l_linger
    enum:
        SOL_SOCKET
        SO_LINGER
        SO_ERROR
        SHUT_WR
        SHUT_RDWR
        MSG_NOSIGNAL
        MSG_DONTWAIT
        MSG_PEEK
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
    int socket(int domain, int type, int protocol)
    int connect(int sockfd, const sockaddr *addr, socklen_t addrlen)
    int accept4(int sockfd, sockaddr *addr, socklen_t *addrlen, int flags)
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    ssize_t send(int sockfd, const void *buf, size_t len, int flags)
    int shutdown(int sockfd, int how)
    int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen)
    int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen)
    int getsockname(int sockfd, sockaddr *addr, socklen_t *addrlen)
    int getpeername(int sockfd, sockaddr *addr, socklen_t *addrlen)


cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP
        AF_INET
        AF_INET6
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct in6_addr:
        pass
    struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr
    uint16_t ntohs(uint16_t netshort)


cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY


cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    struct timespec:
        long tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(clockid_t clk_id, timespec *tp)


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start_routine)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
