// Kernel registry of the simulated CUDA driver (fake_cuda.cpp). build.rs compiles each
// csrc/*.cu for the fake driver through a generated wrapper that includes the .cu file and
// registers every `extern "C" __global__` kernel by name with a binder: cuLaunchKernel's
// `void** kernelParams` (one pointer per argument, as the real driver takes them) are copied
// into a tuple of the kernel's own parameter types, so a launch can also be recorded into a
// graph and replayed after the caller's arguments are gone.
#pragma once
#include <cstddef>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#include <vector>

using SimBound = std::function<void()>;
// A bound launch: the kernel with its arguments copied, and each argument's value if it is a
// pointer (nullptr otherwise), which the driver checks against its allocations.
struct SimCall {
  SimBound run;
  std::vector<const void*> ptrs;
};
using SimBinder = SimCall (*)(void** params);

template <class T>
const void* sim_ptr_of(const T& v) {
  if constexpr (std::is_pointer_v<T>) {
    return (const void*)v;
  } else {
    return nullptr;
  }
}

// Registers `name` (called from static initialisers). concurrent: the kernel's blocks wait for
// each other or for other ranks' blocks (grid barriers, the P2P all-reduce), so they must run
// at once, each on its own OS thread.
bool sim_register(const char* name, SimBinder bind, bool concurrent);

template <class F>
struct SimSig;
template <class... A>
struct SimSig<void (*)(A...)> {
  static constexpr std::size_t N = sizeof...(A);
  template <auto K, std::size_t... I>
  static SimCall bind(void** p, std::index_sequence<I...>) {
    std::tuple<std::decay_t<A>...> args{*static_cast<std::decay_t<A>*>(p[I])...};
    SimCall c;
    c.ptrs = {sim_ptr_of(std::get<I>(args))...};
    c.run = [args]() { std::apply(K, args); };
    return c;
  }
};

template <auto K>
SimCall sim_bind(void** p) {
  using S = SimSig<decltype(K)>;
  return S::template bind<K>(p, std::make_index_sequence<S::N>{});
}
