#pragma once
// dist::World: the communicator a process trains with. Started by an MPI launcher (mpirun, srun) in a build with
// MPI (CUMO_WITH_MPI=1), it is MPI_COMM_WORLD; otherwise, or with engine "self", the world of one process. A plain
// `cumo_train …` therefore never initialises MPI, and a build without MPI still runs single-process.
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include "cumo/core/error.hpp"
#include "cumo/dist/communicator.hpp"
#if defined(CUMO_WITH_MPI) && CUMO_WITH_MPI
#include "cumo/dist/mpi.hpp"
#endif

namespace cumo::dist {

inline constexpr bool kHaveMpi =
#if defined(CUMO_WITH_MPI) && CUMO_WITH_MPI
    true;
#else
    false;
#endif

// The collective timeout: CUMO_COMM_TIMEOUT (seconds) when set, else `fallback`.
inline double comm_timeout_from_env(double fallback = 600) {
  if (const char* v = std::getenv("CUMO_COMM_TIMEOUT")) {
    char* end = nullptr;
    const double t = std::strtod(v, &end);
    CUMO_CHECK(end != v && *end == '\0' && t > 0, "CUMO_COMM_TIMEOUT must be a positive number of seconds, got '",
               v, "'");
    return t;
  }
  return fallback;
}

class World {
 public:
  // engine: "auto" (MPI when launched by an MPI launcher and built with it, else self), "mpi" or "self".
  World(int* argc, char*** argv, std::string_view engine = "auto", double timeout_s = comm_timeout_from_env()) {
    CUMO_CHECK(engine == "auto" || engine == "mpi" || engine == "self", "dist::World: engine must be auto, mpi or "
               "self, got '", engine, "'");
#if defined(CUMO_WITH_MPI) && CUMO_WITH_MPI
    if (engine == "mpi" || (engine == "auto" && MpiSession::launched())) {
      session_ = std::make_shared<MpiSession>(argc, argv);
      comm_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, timeout_s);
      return;
    }
#else
    (void)argc;
    (void)argv;
    (void)timeout_s;
    CUMO_CHECK(engine != "mpi", "dist::World: engine mpi, but this build has no MPI (install libopenmpi-dev and "
               "reconfigure: cmake finds it)");
#endif
    comm_ = std::make_unique<SelfCommunicator>();
  }
  World(const World&) = delete;
  World& operator=(const World&) = delete;
  ~World() {
    comm_.reset();  // before MPI_Finalize
    session_.reset();
  }

  Communicator& comm() { return *comm_; }
  int rank() const { return comm_->rank(); }
  int size() const { return comm_->size(); }

 private:
  std::shared_ptr<void> session_;  // the MpiSession when MPI is up (type-erased: the layout is the same in every build)
  std::unique_ptr<Communicator> comm_;
};

}  // namespace cumo::dist
